"""Property-based checks (Hypothesis): random MedMCQA-shaped files in every supported format, with random
corruptions, and random option values for every command. The contract each example must keep:

* the loader returns rows or raises `DataError`; the CLI exits 0 or 2 — never a traceback, at most one
  `medlora: error:` line, of bounded length;
* with `--skip_invalid`, no row vanishes: every input row is kept, listed (skipped.jsonl / report), or counted
  as an exact duplicate;
* nothing outside the output directory is created, changed or removed.

Seeded (`derandomize`), so CI runs the same examples every time; a failure Hypothesis finds is shrunk and then
kept as a regular test (the row cases in test_bad_input.py began that way). The option walk stops after
validation (a stub replaces the command's work): running every random option for real would take hours; the
commands' real runs on random files are `prepare` and `eval` below.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
from dataclasses import fields, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import run_main
from medlora.data import DataError, load_medmcqa, write_skipped
from medlora.errors import MAX_MESSAGE_CHARS, MedloraError

FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
ODD_TEXT = ["\u2028", "\u0085", "\r", "\x00", "\u200b", "\u202e", "\ufeff", "\ud800", "é", "🧠", "\t", '"', ",", "\\"]

# ---------------------------------------------------------------- random files

text_value = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=30),
    st.builds(lambda a, odd, b: a + odd + b, st.text(max_size=8), st.sampled_from(ODD_TEXT), st.text(max_size=8)),
    st.sampled_from(["", " ", "\t\n", "x" * 21_000]),
)
any_value = st.one_of(text_value, st.none(), st.integers(-10, 10), st.floats(allow_nan=True), st.booleans(),
                      st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                          max_size=1))
cop_value = st.one_of(st.integers(0, 4), st.integers(0, 4), st.integers(-3, 9), st.integers(10**30, 10**31),
                      st.sampled_from(["1", "B", "", " 2 "]), st.booleans(), st.floats(allow_nan=True), st.none())


@st.composite
def mcq_row(draw, i: int):
    row = {"question": f"Question {i}: which structure {draw(st.integers(0, 5))}?", "opa": f"a{i}", "opb": f"b{i}",
           "opc": f"c{i}", "opd": f"d{i}", "cop": draw(st.integers(0, 3)),
           "subject_name": draw(st.sampled_from(["Anatomy", "Surgery", "Physiology"]))}
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # most rows whole, some with 1-2 corrupted fields
        name = draw(st.sampled_from([*row, "exp", "id", "extra"]))
        if draw(st.booleans()) and name in row:
            del row[name]
        else:
            row[name] = draw(cop_value if name == "cop" else any_value)
    return row


@st.composite
def data_file(draw, min_rows: int = 1, max_rows: int = 8):
    """(file name, bytes, rows written or None where the file's structure was corrupted on purpose)."""
    fmt = draw(st.sampled_from(["jsonl", "json", "csv", "parquet"]))
    rows = [draw(mcq_row(i)) for i in range(draw(st.integers(min_rows, max_rows)))]
    rows += [dict(rows[0])] * draw(st.integers(0, 1))  # an exact duplicate, sometimes
    count = len(rows)
    if fmt == "jsonl":
        lines = []
        for row in rows:
            try:
                line = json.dumps(row, ensure_ascii=draw(st.booleans()))
            except ValueError:
                line = json.dumps(row)
            if draw(st.integers(0, 9)) == 0 and len(row) > 1:  # a key given twice
                key = draw(st.sampled_from(sorted(row)))
                line = line[:-1] + f", {json.dumps(key)}: {json.dumps(str(row[key]) + '!')}" + "}"
            if draw(st.integers(0, 12)) == 0:
                line = draw(st.sampled_from(["[1, 2]", "{", "null", '"text"', "[" * 5000 + "]" * 5000]))
            lines.append(line)
        blob = draw(st.sampled_from(["\n", "\r\n"])).join(lines) + draw(st.sampled_from(["", "\n", "\n\n  \n"]))
        raw = blob.encode("utf-8", "surrogatepass")  # a raw lone surrogate is invalid UTF-8 bytes: a bad line
    elif fmt == "json":
        raw = json.dumps(rows, indent=draw(st.sampled_from([None, 1]))).encode()
    elif fmt == "csv":
        header = ["question", "opa", "opb", "opc", "opd", "cop", "subject_name"]
        if draw(st.integers(0, 9)) == 0:
            header.append(draw(st.sampled_from(header)))  # a repeated column: refused whole
        out = io.StringIO()
        writer = csv.writer(out, lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
        writer.writerow(header)
        for row in rows:
            cells = ["" if row.get(h) is None else str(row.get(h)) for h in header]
            cells += ["extra"] * (draw(st.integers(0, 15)) == 0)
            writer.writerow(cells)
        raw = out.getvalue().encode("utf-8", "surrogatepass")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        def cell(row, key):  # one Arrow type per column: text as text, cop as int64 (else null)
            value = row.get(key)
            if key == "cop":
                return value if type(value) is int and abs(value) < 2**63 else None
            return None if value is None else str(value).encode("utf-8", "replace").decode()

        columns = ["question", "opa", "opb", "opc", "opd", "cop", "subject_name"]
        table = pa.Table.from_pylist([{k: cell(row, k) for k in columns} for row in rows])
        sink = io.BytesIO()
        pq.write_table(table, sink)
        raw = sink.getvalue()
    damage = draw(st.sampled_from(["none"] * 6 + ["truncate", "bom", "utf16", "latin1-byte", "empty"]))
    if damage == "truncate":
        raw, count = raw[: draw(st.integers(0, max(0, len(raw) - 1)))], None
    elif damage == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif damage == "utf16" and fmt != "parquet":
        raw, count = raw.decode("utf-8", "replace").encode("utf-16"), None
    elif damage == "latin1-byte" and fmt == "jsonl" and b"Question" in raw:
        raw = raw.replace(b"Question", b"Qu\xe9stion", 1)  # that line is not UTF-8: one bad row
    elif damage == "empty":
        raw, count = b"", None
    return f"data.{fmt}", raw, count


def _write(directory: Path, name: str, raw: bytes) -> Path:
    path = directory / name
    path.write_bytes(raw)
    return path


@settings(FUZZ, max_examples=2000)
@given(data_file(), st.booleans(), st.booleans(), st.sampled_from(["auto", "0", "1"]))
def test_loader_returns_rows_or_one_data_error_and_loses_no_row(tmp_path, sample, skip, evaluation, cop_base):
    name, raw, count = sample
    directory = Path(tempfile.mkdtemp(dir=tmp_path))
    path = _write(directory, name, raw)
    try:
        rows, report = load_medmcqa(str(path), cop_base=cop_base, skip_invalid=skip, evaluation=evaluation)
    except DataError as err:
        event("refused whole")
        assert len(str(err)) < 40_000 and str(err).startswith(str(path)), str(err)[:2000]
        return
    event(f"returned, {'some' if report.issues else 'no'} rows skipped")
    lines = [str(r["line"]) for r in rows]  # "1 (element 3)" in a compact JSON array: still one per row
    assert len(set(lines)) == len(lines) and not set(lines) & {str(i.line) for i in report.issues}
    assert len({r["id"] for r in rows}) == len(rows)
    assert not report.issues or skip  # strict mode never returns with a row left out
    if count is not None and name.endswith((".jsonl", ".json", ".parquet")):
        # every row written is kept, listed as skipped or counted as an exact duplicate (CSV rows may be re-cut by
        # a quote in a value, so only the three formats with a fixed row count are counted)
        assert len(rows) + len(report.issues) + report.duplicates_removed == count, (report.summary(), count)
    if report.issues:
        written = write_skipped(report, directory / "out").read_text(encoding="utf-8").rstrip("\n").split("\n")
        assert [json.loads(line)["line"] for line in written] == [int(i.line) for i in report.issues]
    for row in rows:
        json.dumps(row, ensure_ascii=False).encode("utf-8")  # every kept row can be written (Arrow, JSON)


def _tree(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for folder, dirs, files in os.walk(root):
        if Path(folder) == skip or skip in Path(folder).parents:
            continue
        for name in files + dirs:
            path = Path(folder) / name
            if path == skip:
                continue
            info = path.lstat()
            found[str(path)] = (info.st_size, info.st_mtime_ns)
    return found


def _assert_contract(code, err: str) -> None:
    event(f"exit {code}" + (" " + re.sub(r"/\S*/", "", err[err.find("medlora: error:") + 16:])[:60] if code else ""))
    assert code in (0, 2), f"exit {code}\n{err[-3000:]}"
    assert "Traceback" not in err and "internal error" not in err, err[-3000:]
    assert err.count("medlora: error:") <= 1, err[-3000:]
    message = err[err.find("medlora: error:"):] if "medlora: error:" in err else ""
    assert len(message) <= MAX_MESSAGE_CHARS + 200, len(message)


@settings(FUZZ, max_examples=80)
@given(data_file(min_rows=8, max_rows=24), st.sampled_from([True, True, False]),
       st.sampled_from(["0.2"] * 4 + ["0.5", "0", "1.5", "nan"]), st.sampled_from(["0"] * 3 + ["0.1", "-1"]),
       st.sampled_from(["auto"] * 4 + ["0", "1", "2"]))
def test_prepare_on_random_files_keeps_the_contract(tiny_dir, tmp_path, capsys, monkeypatch, sample, skip,
                                                    eval_fraction, test_fraction, cop_base):
    monkeypatch.setenv("COLUMNS", "300")
    name, raw, count = sample
    directory = Path(tempfile.mkdtemp(dir=tmp_path))
    path = _write(directory, name, raw)
    out = directory / "prepared"
    before = _tree(directory, out)
    code, stdout, err = run_main(["prepare", "--data", path, "--output_dir", out, "--model_name_or_path", tiny_dir,
                                  "--skip_invalid", str(skip).lower(), "--eval_fraction", eval_fraction,
                                  "--test_fraction", test_fraction, "--cop_base", cop_base], capsys)
    _assert_contract(code, err)
    assert _tree(directory, out) == before  # the input and its directory untouched
    if code == 0:
        summary = json.loads((out / "prepare_summary.json").read_text())
        kept = sum(s["rows"] for s in summary["splits"].values())
        assert kept + summary["invalid_skipped"] + summary["duplicates_removed"] == summary["rows_read"]
        if count is not None and not name.endswith(".csv"):
            assert summary["rows_read"] == count
        skipped = out / "skipped.jsonl"
        listed = len(skipped.read_text().rstrip("\n").split("\n")) if skipped.exists() else 0
        assert listed == summary["invalid_skipped"]


@settings(FUZZ, max_examples=16)
@given(data_file(), st.booleans())
def test_eval_on_random_files_keeps_the_contract(tiny_dir, tmp_path, capsys, monkeypatch, sample, skip):
    monkeypatch.setenv("COLUMNS", "300")
    name, raw, _ = sample
    directory = Path(tempfile.mkdtemp(dir=tmp_path))
    path = _write(directory, name, raw)
    out = directory / "eval"
    before = _tree(directory, out)
    code, _, err = run_main(["eval", "--data", path, "--output_dir", out, "--model_name_or_path", tiny_dir,
                             "--skip_invalid", str(skip).lower(), "--bootstrap_samples", "0", "--limit", "4"], capsys)
    _assert_contract(code, err)
    assert _tree(directory, out) == before
    if code == 0:
        assert json.loads((out / "summary.json").read_text())["n"] >= 1


# ---------------------------------------------------------------- random option values, every command

def _values(kind: str):
    number = st.one_of(st.integers(-3, 3), st.integers(-(10**15), 10**15), st.sampled_from(["nan", "inf", "-inf",
                                                                                            "1e309", "0x10", ""]))
    if "bool" in kind:
        return st.sampled_from(["true", "false", "maybe", "1", ""])
    if "int" in kind or "float" in kind:
        return st.one_of(number, st.floats(allow_nan=True, allow_infinity=True))
    return st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "../..", "/dev/null", "x" * 3000, "%s %(x)",
                                                            "-", "--help-me", "\u2028"]))


@st.composite
def command_line(draw):
    from medlora.cli import COMMANDS

    name = draw(st.sampled_from(sorted(COMMANDS)))
    sections = COMMANDS[name].sections()
    import typing

    options = [(f.name, str(typing.get_type_hints(s).get(f.name, f.type))) for s in sections for f in fields(s)]
    argv = [name]
    for option, kind in draw(st.lists(st.sampled_from(options), max_size=4, unique=True)):
        argv.append(f"--{option}")
        count = draw(st.integers(0, 2)) if "list" in kind else 1
        argv += [str(draw(_values(kind))) for _ in range(count)]
    if draw(st.integers(0, 5)) == 0:
        argv.insert(draw(st.integers(1, len(argv))), draw(st.sampled_from(["--config", "--nonexistent", "-x", "--"])))
    return argv


@settings(FUZZ, max_examples=2000)
@given(command_line())
def test_random_options_of_every_command_exit_0_or_2_with_one_line(tmp_path, capsys, monkeypatch, argv):
    """Parsing and every validator, with the command's work replaced by a stub (train: its joint validation)."""
    from medlora import cli
    from medlora.config import validate

    def stub(argv, *parsed):
        if argv and cli.COMMANDS["train"].sections() == tuple(type(p) for p in parsed):
            validate(*parsed)

    monkeypatch.setattr(cli, "COMMANDS", {k: replace(c, run=stub) for k, c in cli.COMMANDS.items()})
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(argv, capsys)
    _assert_contract(code, err)
    assert list(tmp_path.iterdir()) == []  # nothing written by parsing and validation


def test_the_guard_turns_an_unexpected_exception_into_one_line_and_a_traceback_file(capsys, monkeypatch):
    """The last resort: a bug in medlora is `medlora: internal error: ...` naming the traceback file, exit 1."""
    from medlora import cli

    def broken(argv, *parsed):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "COMMANDS", {**cli.COMMANDS, "env": replace(cli.COMMANDS["env"], run=broken)})
    code, _, err = run_main(["env"], capsys)
    assert code == 1 and err.count("medlora: internal error:") == 1 and "Traceback" not in err, err
    assert "medlora: internal error: KeyError: 'a bug' (full traceback in " in err
    path = err.split("full traceback in ")[1].split(";")[0]
    assert "raise KeyError" in Path(path).read_text()
    monkeypatch.setenv("MEDLORA_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.main(["env"])
    assert issubclass(DataError, MedloraError)
