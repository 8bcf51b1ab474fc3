"""MedMCQA data: load (hub or local file), validate, clean, deduplicate, split, check leakage.

Rows leave this module in one canonical shape: ``cop`` is 0-3 (A-D) as in the Hugging Face copy
and lm-evaluation-harness, every text field is a cleaned ``str``, and every row carries ``source``
and ``line`` so any later message can point back at the file and line it came from.
"""

from __future__ import annotations

import csv
import difflib
import errno
import io
import json
import os
import random
import re
import stat
import sys
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from medlora.errors import DataError, bounded, describe_os_error, shown  # noqa: F401 - re-exported
from medlora.formatting import (LETTERS, OPTION_FIELDS, FormatOptions, choose_stop_token, encode_example,
                                format_record)

HUB_DATASET = "openlifescienceai/medmcqa"
REQUIRED_FIELDS = ("question", *OPTION_FIELDS, "cop")
OPTIONAL_FIELDS = ("id", "exp", "subject_name", "topic_name", "choice_type")
KNOWN_FIELDS = set(REQUIRED_FIELDS) | set(OPTIONAL_FIELDS)
TEXT_FIELDS = ("question", *OPTION_FIELDS)
LOCAL_SUFFIXES = {".json", ".jsonl", ".parquet", ".csv"}
MAX_FIELD_CHARS = 20_000  # the longest real MedMCQA field is < 3,000 characters
SHOW_FIRST = 10  # bad rows listed one by one before the rest are only counted


@dataclass
class RowIssue:
    source: str
    line: int
    field: str
    reason: str
    row: Any = None

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: field '{self.field}': {self.reason}"


@dataclass
class LoadReport:
    source: str
    rows_read: int = 0
    cop_numbering: str = ""
    issues: list[RowIssue] = field(default_factory=list)
    ignored_fields: Counter = field(default_factory=Counter)
    duplicates_removed: int = 0
    cleaned_rows: int = 0
    ambiguous_rows: int = 0
    duplicates_kept: int = 0

    def summary(self) -> str:
        parts = [f"{self.source}: read {self.rows_read} rows, cop numbering {self.cop_numbering}"]
        if self.issues:
            parts.append(f"{len(self.issues)} invalid rows skipped")
        if self.duplicates_removed:
            parts.append(f"{self.duplicates_removed} exact duplicates removed")
        if self.cleaned_rows:
            parts.append(f"{self.cleaned_rows} rows had whitespace/unicode normalised")
        if self.duplicates_kept:
            parts.append(f"{self.duplicates_kept} rows repeat an earlier question and options (kept)")
        if self.ambiguous_rows:
            parts.append(f"{self.ambiguous_rows} rows whose correct option text also appears as another option")
        if self.ignored_fields:
            parts.append("ignored fields: " + ", ".join(f"{k} ({v} rows)" for k, v in self.ignored_fields.items()))
        return "; ".join(parts)


def format_issues(issues: list[RowIssue], what: str = "invalid rows") -> str:
    lines = [f"{len(issues)} {what}:"]
    lines += [f"  {issue}" for issue in issues[:SHOW_FIRST]]
    if len(issues) > SHOW_FIRST:
        lines.append(f"  ... and {len(issues) - SHOW_FIRST} more")
    return "\n".join(lines)


# ---------------------------------------------------------------- reading


def display_path(path: Path | str) -> str:
    """The path as printable UTF-8 text: a file name that is not valid UTF-8 shows its bad bytes as \\xNN
    (instead of breaking every later print, JSON file and Arrow table that carries the name)."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def printable(text: str) -> str:
    """`text` with any lone surrogate (a JSON `\\ud800` escape) shown as `\\ud800`, so it can be printed."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _Object(dict):
    """A JSON object whose text gave a key more than once (json keeps the last value silently)."""

    duplicate_keys: list[str]


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = _Object(pairs) if len({k for k, _ in pairs}) < len(pairs) else dict(pairs)
    if isinstance(obj, _Object):
        counts = Counter(k for k, _ in pairs)
        obj.duplicate_keys = [k for k, n in counts.items() if n > 1]
    return obj


def _parse_json(text: str) -> Any:
    """json.loads that keeps duplicated keys visible and turns the parser's other failures into ValueError."""
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    # json.JSONDecodeError is a ValueError; so is an integer with more digits than Python converts (4,300)


def _json_problem(err: ValueError) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"not valid JSON ({err.msg} at column {err.colno})"
    return f"not valid JSON ({bounded(err, 120)})"


def _decode(path: Path, raw: bytes) -> str:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark is harmless; drop it rather than corrupt field 1
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        hint = "; the file starts with a UTF-16 byte-order mark: save it as UTF-8" if raw[:2] in (
            b"\xff\xfe", b"\xfe\xff") else "; save the file as UTF-8"
        raise DataError(f"{display_path(path)}:{line}: not valid UTF-8 (byte {err.start}: {err.reason}){hint}") from None


def _read_json_lines(path: Path, raw: bytes) -> tuple[list[tuple[int, Any]], list[RowIssue]]:
    """Rows of a JSON-lines file. Lines are split on b"\\n" only: U+2028 or U+0085 inside a string is text, not
    a line break (str.splitlines would cut the row in two and shift every later line number). Each line is
    decoded on its own, so one line that is not UTF-8 is one invalid row, not a lost file."""
    rows, issues = [], []
    name = display_path(path)
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    offset = 0
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        start, offset = offset, offset + len(chunk) + 1
        try:
            line = chunk.decode("utf-8")
        except UnicodeDecodeError as err:
            issues.append(RowIssue(name, number, "-", f"not valid UTF-8 (byte {start + err.start} of the file: "
                                   f"{err.reason})", chunk.decode("utf-8", "backslashreplace")))
            continue
        if not line.strip():
            continue  # blank lines carry no row
        try:
            obj = _parse_json(line)
        except ValueError as err:
            issues.append(RowIssue(name, number, "-", _json_problem(err), line))
            continue
        rows.append((number, obj))
    return rows, issues


class Position(int):
    """The line a JSON array's element starts on, when other elements start on that line too (a compact array):
    printed as "1 (element 3)", so a message still points at one row; its row id uses the element number."""

    element: int

    def __new__(cls, line: int, element: int):
        obj = super().__new__(cls, line)
        obj.element = element
        return obj

    def __format__(self, spec: str) -> str:
        if spec == "id":
            return f"{int(self)}.{self.element}"
        return f"{int(self)} (element {self.element})"

    __str__ = lambda self: format(self, "")  # noqa: E731


def _positions(lines: list[int]) -> list[int]:
    shared = {line for line, n in Counter(lines).items() if n > 1}
    return [Position(line, i) if line in shared else line for i, line in enumerate(lines, start=1)]


def _line_numbers_of_array(text: str) -> list[int]:
    """Line on which each top-level element of a JSON array starts (for messages)."""
    decoder = json.JSONDecoder(object_pairs_hook=_unique_pairs)
    idx = text.index("[") + 1
    lines = []
    while True:
        while idx < len(text) and text[idx] in " \t\r\n,":
            idx += 1
        if idx >= len(text) or text[idx] == "]":
            return lines
        lines.append(text.count("\n", 0, idx) + 1)
        _, idx = decoder.raw_decode(text, idx)


def _read_csv(path: Path, text: str) -> tuple[list[tuple[int, Any]], list[RowIssue]]:
    """Rows of a CSV file, each numbered by the physical line it starts on (a quoted field may span lines)."""
    name = display_path(path)
    limit = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)  # an over-long field is a row problem (MAX_FIELD_CHARS), not a crash
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        rows, issues = [], []
        header, previous = None, 0
        for cells in reader:
            first, previous = previous + 1, reader.line_num
            if not cells:
                continue  # a blank line
            if header is None:
                header = cells
                repeated = [c for c, n in Counter(header).items() if n > 1]
                if repeated:
                    raise DataError(f"{name}:{first}: CSV header repeats column(s) {repeated}: which one holds "
                                    "the value would be a guess; rename or remove the copy")
                missing = [f for f in REQUIRED_FIELDS if f not in header]
                if missing:
                    raise DataError(f"{name}:{first}: CSV header lacks column(s) {missing}; header is "
                                    f"{bounded(header, 300)}")
                continue
            if len(cells) != len(header):  # columns would shift: every later field would be wrong
                issues.append(RowIssue(name, first, "-", f"has {len(cells)} cells but the header has {len(header)} "
                                       "(an unquoted comma or quote?)", cells))
                continue
            rows.append((first, dict(zip(header, cells))))
    except csv.Error as err:
        raise DataError(f"{name}:{reader.line_num}: not valid CSV ({err})") from None
    finally:
        csv.field_size_limit(limit)
    return rows, issues


def read_raw_rows(path: Path) -> tuple[list[tuple[int, Any]], list[RowIssue]]:
    """(line, object) pairs from a local file, plus rows that could not even be parsed."""
    name = display_path(path)
    try:
        info = path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise DataError(f"{name}: a symbolic link loop (the link points, in the end, back at itself)") from None
        if path.is_symlink():
            raise DataError(f"{name}: a symbolic link to a file that does not exist ({os.readlink(path)})") from None
        if err.errno == errno.ENOENT:
            raise DataError(f"{name}: no such file") from None
        raise DataError(f"{name}: cannot read it ({describe_os_error(err)})") from None
    if stat.S_ISDIR(info.st_mode):
        raise DataError(f"{name}: is a directory without a prepared dataset (no dataset_dict.json from "
                        "`medlora prepare`); pass a .jsonl/.json/.parquet/.csv file or a prepared dataset dir")
    if not stat.S_ISREG(info.st_mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode)
                else "a device")
        raise DataError(f"{name}: is {kind}, not a regular file; medlora reads data files whole (it needs their "
                        "size and checksum), so save the data to a file first")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{name}: unknown file type {shown(suffix)}; use one of {sorted(LOCAL_SUFFIXES)}")
    if info.st_size == 0:
        raise DataError(f"{name}: file is empty")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except OSError as err:
            raise DataError(f"{name}: cannot read Parquet ({bounded(err, 300)})") from None
        except Exception as err:  # pyarrow raises several types for corrupt files
            raise DataError(f"{name}: cannot read Parquet ({type(err).__name__}: {bounded(err, 300)})") from None
        repeated = [c for c, n in Counter(table.column_names).items() if n > 1]
        if repeated:
            raise DataError(f"{name}: repeats column(s) {repeated}; rename or remove the copy")
        return [(i + 1, row) for i, row in enumerate(table.to_pylist())], []
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{name}: cannot read it ({describe_os_error(err)})") from None
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        _decode(path, raw)  # a UTF-16 file: refused whole, with the hint to save it as UTF-8
    if suffix == ".jsonl" or suffix == ".json" and not raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        # .jsonl, or .json holding JSON lines (as the official MedMCQA files do); one object spread over
        # several lines is a common mistake, told apart from JSON lines first
        if raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{") and b"\n" in raw.strip():
            try:
                whole = _parse_json(_decode(path, raw))
            except (ValueError, DataError):
                whole = None  # JSON lines: parsed line by line below
            if isinstance(whole, dict):
                raise DataError(f"{name}:1: the file is one JSON object (keys {bounded(list(whole)[:5], 200)}), "
                                "not one row per line; write JSON lines (one row object per line) or a JSON "
                                "array of rows")
        rows, issues = _read_json_lines(path, raw)
        if not rows and not issues:
            raise DataError(f"{name}: file is empty")
        return rows, issues
    text = _decode(path, raw)
    if not text.strip():
        raise DataError(f"{name}: file is empty")
    if suffix == ".csv":
        return _read_csv(path, text)
    try:
        data = _parse_json(text)
        lines = _line_numbers_of_array(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{name}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    except (ValueError, RecursionError) as err:
        raise DataError(f"{name}: {_json_problem(err) if isinstance(err, ValueError) else 'nested too deeply'}"
                        ) from None
    if not isinstance(data, list):
        raise DataError(f"{name}: a JSON array of rows was expected, got {type(data).__name__}")
    return list(zip(_positions(lines), data)), []


# ---------------------------------------------------------------- validation


def clean_text(value: str) -> str:
    """NFC unicode, no control characters, runs of spaces collapsed, ends stripped. Newlines kept."""
    value = unicodedata.normalize("NFC", value)
    value = "".join(ch for ch in value if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    value = re.sub(r"[ \t\u00a0]+", " ", value)
    value = re.sub(r" *\n *", "\n", value)
    return value.strip()


def normalise_key(text: str) -> str:
    """Comparison key: case, punctuation and spacing ignored."""
    return re.sub(r"[\W_]+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _parse_cop(value: Any, from_text: bool) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if from_text and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def detect_cop_base(values: Iterable[int], source: str, cop_base: str,
                    lines: Iterable[int] | None = None) -> tuple[int, str]:
    """0 for hub numbering (0-3), 1 for the official files (1-4). Never a silent guess.

    `lines` (the line of each value) lets a mixed-numbering message point at the rows.
    """
    if cop_base in ("0", "1"):
        base = int(cop_base)
        return base, ("0-3 (hub; set by cop_base)" if base == 0 else "1-4 (official; set by cop_base)")
    if cop_base != "auto":
        raise DataError(f"cop_base must be 'auto', '0' or '1', got {cop_base!r}")
    values = list(values)
    seen = set(values)
    if 0 in seen and 4 in seen:
        where = ""
        if lines is not None:
            first = dict(reversed(list(zip(values, lines))))  # value -> first line holding it
            where = f" (cop 0 first on line {first[0]}, cop 4 first on line {first[4]})"
        raise DataError(
            f"{source}: field 'cop' mixes 0 and 4, i.e. both numberings (0-3 and 1-4){where}; "
            "fix the file or set cop_base"
        )
    if 0 in seen:
        return 0, "0-3 (hub; detected: a cop of 0 occurs)"
    if 4 in seen:
        return 1, "1-4 (official; detected: a cop of 4 occurs)"
    raise DataError(
        f"{source}: field 'cop' only holds values in 1-3, so it cannot tell the official numbering (1-4) from the "
        "hub's (0-3); set cop_base to 1 or 0 (--cop_base)"
    )


def row_problem(obj: dict[str, Any], from_text: bool = False,
                required: Iterable[str] = REQUIRED_FIELDS) -> tuple[str, str] | None:
    """(field, reason) for the first problem of one row object, or None.

    `required=("question", *OPTION_FIELDS)` checks a question without an answer (what `medlora ask` gets).
    """
    for name in getattr(obj, "duplicate_keys", ()):
        return name, "is given twice in this row (JSON keeps only the last value silently); keep one"
    for name in required:
        if name not in obj:
            typo = difflib.get_close_matches(name, [str(k) for k in obj if k not in KNOWN_FIELDS], n=1)
            return name, "missing" + (f" (the row has '{typo[0]}': misspelt?)" if typo else "")
        value = obj[name]
        if value is None:
            return name, "is null"
        if name == "cop":
            if _parse_cop(value, from_text) is None:
                return name, f"must be an integer, got {type(value).__name__} {value!r}"
        elif not isinstance(value, str):
            return name, f"must be a string, got {type(value).__name__}"
        elif not value.strip():
            return name, "is empty"
        elif len(value) > MAX_FIELD_CHARS:
            return name, f"is {len(value):,} characters long (limit {MAX_FIELD_CHARS:,})"
    for name in OPTIONAL_FIELDS:
        value = obj.get(name)
        if value is not None and not isinstance(value, (str, int)) or isinstance(value, bool):
            return name, f"must be a string or null, got {type(value).__name__}"
    for name in (*required, *OPTIONAL_FIELDS):
        if isinstance(obj.get(name), str) and not _encodable(obj[name]):
            return name, "holds a lone surrogate (a \\ud800-\\udfff escape that is half of a character): not text"
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _well_formed(raw: list[tuple[int, Any]], source: str, from_text: bool, report: LoadReport) -> list:
    """(line, object) of the rows that are objects with every required field; the rest go to `report`."""
    candidates = []
    for line, obj in raw:
        if not isinstance(obj, dict):
            kind = "null" if obj is None else type(obj).__name__
            report.issues.append(RowIssue(source, line, "-", f"row is a {kind}, not an object", obj))
            continue
        problem = row_problem(obj, from_text)
        if problem:
            report.issues.append(RowIssue(source, line, problem[0], problem[1], obj))
            continue
        for name in obj:
            if name not in KNOWN_FIELDS:
                report.ignored_fields[printable(str(name))[:80]] += 1
        candidates.append((line, obj))
    return candidates


def _clean_row(obj: dict, line, cop: int, source: str, evaluation: bool, report: LoadReport) -> dict | None:
    """The row medlora keeps (text fields, cop 0-3, metadata, id, where it came from), or None when cleaning
    leaves a text field empty (reported)."""
    # Evaluation scores the text as published (lm-eval parity); training data is cleaned.
    row = {name: obj[name] if evaluation else clean_text(obj[name]) for name in TEXT_FIELDS}
    if any(row[name] != obj[name] for name in TEXT_FIELDS):
        empty = [name for name in TEXT_FIELDS if not row[name]]
        if empty:  # only invisible (control/format) characters: cleaning would leave nothing
            report.issues.append(RowIssue(source, line, empty[0], "is empty once control and format "
                                          "characters are removed", obj))
            return None
        report.cleaned_rows += 1
    row["cop"] = cop
    for name in ("exp", "subject_name", "topic_name", "choice_type"):
        value = obj.get(name)
        row[name] = clean_text(str(value)) if value not in (None, "") else None
    row["subject_name"] = row["subject_name"] or "Unknown"
    row["id"] = str(obj["id"]) if obj.get("id") not in (None, "") else f"{Path(source).name}:{line:id}" if isinstance(line, Position) else f"{Path(source).name}:{line}"
    row["source"], row["line"] = source, line
    return row


def validate_rows(
    raw: list[tuple[int, Any]],
    source: str,
    cop_base: str = "auto",
    evaluation: bool = False,
    from_text: bool = False,
) -> tuple[list[dict[str, Any]], LoadReport]:
    """Check every row; return the valid ones (cleaned, cop 0-3) and a report holding the rest."""
    report = LoadReport(source=source, rows_read=len(raw))
    candidates = _well_formed(raw, source, from_text, report)
    if not candidates:
        if report.issues:
            raise DataError(f"{source}: no valid rows.\n" + format_issues(report.issues))
        raise DataError(f"{source}: holds no rows")
    try:
        base, report.cop_numbering = detect_cop_base(
            [_parse_cop(o["cop"], from_text) for _, o in candidates], source, cop_base, [ln for ln, _ in candidates]
        )
    except DataError as err:
        if report.issues:  # the rows already found invalid are reported too, not hidden behind this message
            raise DataError(f"{err}\n{format_issues(report.issues)}") from None
        raise

    rows, seen_ids, seen_content = [], {}, {}
    for line, obj in candidates:
        cop = _parse_cop(obj["cop"], from_text) - base
        if not 0 <= cop <= 3:
            report.issues.append(  # cop_numbering reads "1-4 (official; detected: ...)" or "0-3 (hub; ...)"
                RowIssue(source, line, "cop", f"{obj['cop']!r} is outside {report.cop_numbering}", obj)
            )
            continue
        row = _clean_row(obj, line, cop, source, evaluation, report)
        if row is None:
            continue

        option_keys = [normalise_key(row[name]) for name in OPTION_FIELDS]
        if len(set(option_keys)) == 1 and not evaluation:
            report.issues.append(RowIssue(source, line, "opa-opd", "all four options are identical", obj))
            continue
        row["ambiguous"] = option_keys.count(option_keys[cop]) > 1
        if row["ambiguous"]:
            if not evaluation:
                twin = LETTERS[[i for i, k in enumerate(option_keys) if k == option_keys[cop] and i != cop][0]]
                report.issues.append(
                    RowIssue(
                        source, line, OPTION_FIELDS[cop],
                        f"the correct option ({LETTERS[cop]}) has the same text as option {twin}; the answer is ambiguous",
                        obj,
                    )
                )
                continue
            report.ambiguous_rows += 1
        if row["id"] in seen_ids:
            report.issues.append(
                RowIssue(source, line, "id", f"duplicate id {row['id']!r} (first on line {seen_ids[row['id']]})", obj)
            )
            continue
        seen_ids[row["id"]] = line
        content = (normalise_key(row["question"]), *option_keys)
        if content in seen_content and evaluation:
            # evaluation scores every row, as lm-evaluation-harness does; repeats are only counted
            report.duplicates_kept += 1
        elif content in seen_content:
            first = seen_content[content]
            if first["cop"] != cop:
                report.issues.append(
                    RowIssue(
                        source, line, "cop",
                        f"same question and options as line {first['line']} but a different answer "
                        f"({LETTERS[cop]} vs {LETTERS[first['cop']]})",
                        obj,
                    )
                )
            else:
                report.duplicates_removed += 1
            continue
        seen_content.setdefault(content, row)
        rows.append(row)
    if not rows:
        raise DataError(f"{source}: no valid rows.\n" + format_issues(report.issues))
    return rows, report


def load_medmcqa(
    source: str,
    split: str = "train",
    cop_base: str = "auto",
    skip_invalid: bool = False,
    evaluation: bool = False,
    scrub: Callable[[Any], Any] | None = None,
) -> tuple[list[dict[str, Any]], LoadReport]:
    """Rows from a local file or the hub dataset `openlifescienceai/medmcqa` (split `train`/`validation`).

    Strict by default: any invalid row raises `DataError` listing file, line and field.
    With `skip_invalid` the valid rows are returned and the report holds the skipped ones.
    `evaluation=True` keeps the text exactly as given (no cleaning: lm-eval parity), and rows whose
    correct option text repeats, whose options are all identical, or which repeat an earlier question
    are kept (flagged `ambiguous` / counted), because lm-evaluation-harness scores them too;
    structural errors still fail.
    `scrub`, if given, replaces every row as read (and every unparseable line) before validation,
    cleaning and deduplication (`medlora prepare --deidentify` scrubs identifiers this way).
    """
    path = Path(source).expanduser()
    if is_prepared_dir(path):  # a `medlora prepare` directory: its held-out split, as prepared
        name, rows = prepared_split(path, split)
        report = LoadReport(source=f"{display_path(path)}[{name}]", rows_read=len(rows),
                            cop_numbering="0-3 (a prepared dataset)")
        return rows, report
    if path.exists() or path.suffix.lower() in LOCAL_SUFFIXES or source.startswith((".", "/", "~")):
        raw, parse_issues = read_raw_rows(path)
        from_text = path.suffix.lower() == ".csv"
        name = display_path(path)
    else:
        raw, parse_issues = _load_hub_rows(source, split), []
        from_text = False
        name = f"{source}[{split}]"
        if cop_base == "auto" and source == HUB_DATASET:
            cop_base = "0"  # the hub copy numbers cop 0-3: known, not guessed
    if scrub is not None:
        scrubbed = []
        for line, obj in raw:
            try:
                clean = scrub(obj)
            except RecursionError:  # the row cannot be a valid row anyway; it must not be written unscrubbed
                parse_issues.append(RowIssue(name, line, "-", "nested too deeply", None))
                continue
            if getattr(obj, "duplicate_keys", None) and isinstance(clean, dict):
                clean = _Object(clean)
                clean.duplicate_keys = obj.duplicate_keys
            scrubbed.append((line, clean))
        raw = scrubbed
        for issue in parse_issues:
            issue.row = scrub(issue.row) if isinstance(issue.row, (str, list, dict)) else None
    try:
        rows, report = validate_rows(raw, name, cop_base, evaluation, from_text)
    except DataError as err:
        if parse_issues:
            raise DataError(f"{err}\n{format_issues(parse_issues, 'unparseable lines')}") from None
        raise
    report.issues[:0] = parse_issues
    report.rows_read += len(parse_issues)
    if report.issues and not skip_invalid:
        raise DataError(
            f"{name}: {format_issues(report.issues)}\n"
            "Fix these rows, or pass --skip_invalid to train on the valid rows and list the rest in skipped.jsonl."
        )
    return rows, report


def _load_hub_rows(dataset_id: str, split: str) -> list[tuple[int, Any]]:
    from datasets import load_dataset

    try:
        data = load_dataset(dataset_id, split=split)
    except Exception as err:  # offline, unknown id, or missing split
        raise DataError(
            f"cannot load dataset {dataset_id!r} (split {split!r}) from the Hugging Face Hub: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
            "Offline? Point --data_path at a local .jsonl/.json/.parquet/.csv file instead "
            "(e.g. data/sample/medmcqa_sample.jsonl)."
        ) from None
    return [(i + 1, row) for i, row in enumerate(data)]


def write_skipped(report: LoadReport, output_dir: Path) -> Path | None:
    """skipped.jsonl: one object per skipped row with its source, line, field and reason (written whole, then
    renamed into place: never a partial file)."""
    if not report.issues:
        return None
    from medlora.outputs import write_atomic

    lines = []
    for issue in report.issues:
        row = issue.row if isinstance(issue.row, (dict, list, str, int, float)) else repr(issue.row)
        record = {"source": issue.source, "line": issue.line, "field": issue.field, "reason": issue.reason}
        try:
            lines.append(json.dumps(record | {"row": row}, ensure_ascii=False, default=str).encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate: JSON's own \\ud800 escape keeps the row as it was read
            lines.append(json.dumps(record | {"row": row}, default=str).encode("utf-8"))
        except (ValueError, RecursionError):  # nesting too deep to write back: the row's text, cut
            try:
                text = printable(repr(row))[:MAX_FIELD_CHARS]
            except RecursionError:
                text = "(row nested too deeply to show)"
            lines.append(json.dumps(record | {"row": text}, ensure_ascii=False).encode("utf-8"))
    path = output_dir / "skipped.jsonl"
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, b"\n".join(lines) + b"\n")
    return path


# ---------------------------------------------------------------- splitting


def split_rows(
    rows: list[dict[str, Any]], eval_fraction: float, seed: int, test_fraction: float = 0.0
) -> dict[str, list[dict[str, Any]]]:
    """Stratified by subject; rows sharing a normalised question stem always land in one split.

    Stems are grouped first, across subjects (MedMCQA files the same question under two subjects at times): a
    group goes with its most common subject, so the pair is never split and the leakage check never fires on it.
    """
    if not 0 < eval_fraction < 1 or not 0 <= test_fraction < 1 or eval_fraction + test_fraction >= 1:
        raise DataError(f"split fractions must be in (0, 1) and sum below 1: eval={eval_fraction} test={test_fraction}")
    by_stem: dict[str, list] = defaultdict(list)
    for row in rows:
        by_stem[normalise_key(row["question"])].append(row)
    groups: dict[str, dict[str, list]] = defaultdict(dict)
    for stem, members in by_stem.items():
        subjects = Counter(r["subject_name"] for r in members)
        subject = min(subjects, key=lambda name: (-subjects[name], name))
        groups[subject][stem] = members
    rng = random.Random(seed)
    splits: dict[str, list] = {"train": [], "eval": [], "test": []}
    for subject in sorted(groups):
        stems = sorted(groups[subject])
        rng.shuffle(stems)
        n = len(stems)
        n_eval = max(1, round(n * eval_fraction)) if n >= 2 else 0
        n_test = max(1, round(n * test_fraction)) if test_fraction and n - n_eval >= 2 else 0
        for i, stem in enumerate(stems):
            target = "eval" if i < n_eval else "test" if i < n_eval + n_test else "train"
            splits[target].extend(groups[subject][stem])
    if not test_fraction:
        del splits["test"]
    for name, part in splits.items():
        if not part:
            raise DataError(f"split '{name}' is empty: {len(rows)} rows are too few for these fractions")
    check_leakage(splits)
    return splits


def check_leakage(splits: dict[str, list[dict[str, Any]]]) -> None:
    """Fail loudly if a normalised question text occurs in more than one split."""
    owner: dict[str, str] = {}
    leaks = []
    for name, part in splits.items():
        for row in part:
            key = normalise_key(row["question"])
            if key in owner and owner[key] != name:
                leaks.append(f"  {row['source']}:{row['line']} ({name}) repeats a question of split '{owner[key]}'")
            owner.setdefault(key, name)
    if leaks:
        raise DataError(f"{len(leaks)} questions leak between splits:\n" + "\n".join(leaks[:SHOW_FIRST]))


def letter_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts = Counter(LETTERS[r["cop"]] for r in rows)
    return {letter: counts.get(letter, 0) for letter in LETTERS}


# ---------------------------------------------------------------- from rows to training examples


def format_options(data, stop_token: str | None = None):
    """FormatOptions from the flags; `stop_token` is the one `choose_stop_token` picked for the loaded model."""
    if stop_token is None and data.style == "plain" and data.stop_token != "auto":
        stop_token = data.stop_token
    return FormatOptions(style=data.style, include_option_text=data.include_option_text,
                         include_explanation=data.include_explanation, add_bos_token=data.add_bos_token,
                         stop_token=stop_token, enable_thinking=data.enable_thinking)


def resolve_format(data, tokenizer, zero_rows):
    """(FormatOptions, record) with the stop token chosen against the model's weights (`zero_rows`, see
    `formatting.choose_stop_token`): a loaded model's rows in `train`, the checkpoint's rows in `inspect`/`prepare`."""
    stop_token, stop = choose_stop_token(tokenizer, data.style, data.stop_token, zero_rows)
    options = format_options(data, stop_token)
    return options, format_record(tokenizer, options, stop)


def describe_format(fmt: dict[str, Any]) -> str:
    stop = fmt["stop"]
    return (f"style {fmt['style']}; stop token {stop['token']!r}" + (f" (id {stop['id']})" if "id" in stop else "")
            + f": {stop['reason']}; BOS {'yes' if fmt['add_bos_token'] else 'no'} ({fmt['bos_source']})")


PREPARED_MARK = "prepare_summary.json"  # written last by `medlora prepare`: its presence means the dataset is whole
PREPARED_COLUMNS = (*REQUIRED_FIELDS, "subject_name", "id")


def is_prepared_dir(path: str | Path) -> bool:
    return (Path(path) / "dataset_dict.json").is_file()


def load_prepared(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The splits of a `medlora prepare` directory, checked like a raw file: complete (prepare_summary.json
    written), readable, every row with the canonical columns and a cop of 0-3."""
    from datasets import load_from_disk

    where = display_path(path)
    if not (Path(path) / PREPARED_MARK).is_file():
        raise DataError(f"{where}: an incomplete prepared dataset (no {PREPARED_MARK}: `medlora prepare` did not "
                        "finish there); run prepare again with --overwrite true")
    try:
        splits = load_from_disk(str(path))
    except Exception as err:  # datasets/pyarrow raise many types for a damaged directory
        raise DataError(f"{where}: cannot read the prepared dataset ({type(err).__name__}: "
                        f"{bounded(err, 200)}); run prepare again") from None
    out = {}
    for name in splits:
        columns = splits[name].column_names
        missing = [c for c in PREPARED_COLUMNS if c not in columns]
        if missing:
            raise DataError(f"{where}: split '{name}' lacks column(s) {missing} (has {bounded(columns, 200)}); "
                            "not a dataset `medlora prepare` wrote")
        rows = splits[name].to_list()
        for number, row in enumerate(rows, start=1):
            problem = row_problem(row)
            if problem is None and not (isinstance(row["cop"], int) and 0 <= row["cop"] <= 3):
                problem = ("cop", f"must be 0-3 in a prepared dataset (A-D), got {shown(row['cop'])}")
            if problem:
                raise DataError(f"{where}: split '{name}' row {number}: field '{problem[0]}': {problem[1]}")
        out[name] = rows
    return out


def prepared_split(path: str | Path, split: str) -> tuple[str, list[dict[str, Any]]]:
    """(name, rows) of the split to score in a prepared dir: `split` if it has one by that name, else test, else
    eval (the held-out parts `prepare` writes)."""
    splits = load_prepared(path)
    for name in (split, "test", "eval"):
        if name in splits:
            return name, splits[name]
    raise DataError(f"{display_path(path)}: no split to evaluate (has {list(splits)}; wanted {split!r}, test or eval)")


@dataclass
class TrainingData:
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    reports: list[LoadReport]
    general_rows: list[dict[str, Any]] = field(default_factory=list)  # the forgetting guard's questions
    mix: dict[str, Any] | None = None  # what the replay mixture added (counts per source)


def mix_in(train_rows: list[dict[str, Any]], replay_rows: list[dict[str, Any]], ratio: float,
           seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`train_rows` plus replay rows making up `ratio` of the result, seeded. Replay rows are drawn without
    replacement, in further shuffled passes when the replay file is smaller than the share needs (said)."""
    want = round(len(train_rows) * ratio / (1 - ratio))
    rng = random.Random(seed)
    picked: list[dict[str, Any]] = []
    while len(picked) < want:
        order = list(replay_rows)
        rng.shuffle(order)
        picked += order[: want - len(picked)]
    mixed = train_rows + picked
    rng.shuffle(mixed)
    sources = Counter(row["source"] for row in picked)
    return mixed, {"medical": len(train_rows), "replay": len(picked), "replay_unique": len({r["id"] for r in picked}),
                   "replay_passes": round(want / len(replay_rows), 2), "ratio": round(len(picked) / len(mixed), 4),
                   "replay_sources": dict(sources)}


def load_general_data(data, train_rows, eval_rows, reports) -> tuple[list, list, dict | None]:
    """(training rows with the replay mixed in, general eval rows, mix counts). The same file for both flags (the
    offline default) is split by question stem, a third held out for the guard, so no question is both replayed
    and used to measure forgetting."""
    general, replay = [], []
    same = bool(data.general_eval_data and data.mix_data) and \
        Path(data.general_eval_data).expanduser().resolve() == Path(data.mix_data).expanduser().resolve()
    if data.general_eval_data:
        general, report = load_medmcqa(data.general_eval_data, data.eval_split, data.cop_base, data.skip_invalid)
        reports.append(report)
    if same:
        parts = split_rows(general, 1 / 3, data.split_seed)
        replay, general = parts["train"], parts["eval"]
    elif data.mix_data:
        replay, report = load_medmcqa(data.mix_data, data.train_split, data.cop_base, data.skip_invalid)
        reports.append(report)
    if replay:
        check_leakage({"train": train_rows + replay, "eval": eval_rows})
        if general:
            check_leakage({"replay": replay, "general eval": general})
    if general:
        check_leakage({"train": train_rows, "general eval": general})
    if not replay:
        return train_rows, general, None
    mixed, counts = mix_in(train_rows, replay, data.mix_ratio, data.split_seed)
    counts["split_from_general_eval_data"] = same
    return mixed, general, counts


def load_training_data(data, output_dir: Path | None = None) -> TrainingData:
    """Train and eval rows: a prepared dir, a separate eval source, or a seeded split of one source."""
    reports: list[LoadReport] = []
    if is_prepared_dir(data.data_path):
        splits = load_prepared(data.data_path)
        if "train" not in splits or "eval" not in splits:
            raise DataError(f"{data.data_path}: a prepared dataset needs 'train' and 'eval' splits, has {list(splits)}")
        train_rows, eval_rows = splits["train"], splits["eval"]
    else:
        train_rows, report = load_medmcqa(data.data_path, data.train_split, data.cop_base, data.skip_invalid)
        reports.append(report)
        if data.eval_data_path:
            eval_rows, eval_report = load_medmcqa(data.eval_data_path, data.eval_split, data.cop_base,
                                                  data.skip_invalid)
            reports.append(eval_report)
            check_leakage({"train": train_rows, "eval": eval_rows})
        else:
            parts = split_rows(train_rows, data.eval_fraction, data.split_seed)
            train_rows, eval_rows = parts["train"], parts["eval"]
    if data.max_train_samples:
        train_rows = train_rows[: data.max_train_samples]
    if data.max_eval_samples:
        eval_rows = eval_rows[: data.max_eval_samples]
    train_rows, general_rows, mix = load_general_data(data, train_rows, eval_rows, reports)
    if output_dir is not None and any(r.issues for r in reports):  # one skipped.jsonl for every file read
        merged = LoadReport(source="all", issues=[i for r in reports for i in r.issues])
        write_skipped(merged, output_dir)
    return TrainingData(train_rows, eval_rows, reports, general_rows, mix)


def tokenize_rows(rows, tokenizer, options, max_length: int | None, name: str):
    """Pre-tokenised `datasets.Dataset` (input_ids, completion_mask); over-long rows are reported, not cut.

    Truncation would cut the answer and its EOS, so a row longer than `max_length` is left out and
    counted in the returned list instead.
    """
    from datasets import Dataset

    encoded, too_long = [], []
    for row in rows:
        example = encode_example(tokenizer, row, options)
        if max_length and len(example["input_ids"]) > max_length:
            too_long.append(f"{row.get('source', '?')}:{row.get('line', '?')} ({len(example['input_ids'])} tokens)")
            continue
        encoded.append(example)
    if not encoded:
        raise DataError(f"{name}: all {len(too_long)} examples are longer than max_length={max_length} tokens "
                        f"(first: {', '.join(too_long[:3])}); raise --max_length")
    return Dataset.from_list(encoded), too_long


def masked_labels(example: dict[str, Any]) -> list[int]:
    return [t if m else -100 for t, m in zip(example["input_ids"], example["completion_mask"])]
