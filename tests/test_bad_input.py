"""Bad input, command by command: ONE clear message naming the file, line and field (or the option) and exit
code 2 (`medlora.config.main_guard`, "medlora: error: ..." on stderr) — or, where the user asked for it
(`--skip_invalid`), a reported skip (skipped.jsonl written, count printed). Never a traceback, never a row
dropped or altered without a word.

Decisions this suite pins down:
- a UTF-8 byte-order mark is accepted transparently (the rows equal those of the same file without it);
  a UTF-16 file is refused as "not valid UTF-8", with the hint to save it as UTF-8;
- blank lines are skipped and do not shift line numbers;
- extra (unknown) fields are accepted, ignored and named in the load summary;
- exact duplicate questions are removed for training and counted; in evaluation they are kept and counted.

Most cases run the CLI in-process (errors happen during validation, before any model loads); every data case
also calls `load_medmcqa` directly and checks that `skip_invalid=True` reports the same row. The two cases that
need a fresh process (HF_HUB_OFFLINE is read at import; the torchrun script) start in the background when this
module starts and are collected by the last tests, so they overlap with the in-process cases.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from conftest import ROOT, SAMPLE, run_main
from medlora.data import DataError, load_medmcqa, write_skipped

HUB_BASE = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16"
HUB_OTHER = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"
GOOD = {"question": "Question {i}: which nerve supplies muscle {i}?", "opa": "alpha {i}", "opb": "beta {i}",
        "opc": "gamma {i}", "opd": "delta {i}", "cop": 4, "subject_name": "Anatomy", "exp": None, "id": "r{i}"}
CSV_HEADER = "question,opa,opb,opc,opd,cop,subject_name\n"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")


def row(i: int, **changes: Any) -> dict[str, Any]:
    r = {k: (v.format(i=i) if isinstance(v, str) else v) for k, v in GOOD.items()}
    r.update(changes)
    return r


def without(r: dict[str, Any], *keys: str, **renamed: str) -> dict[str, Any]:
    """`r` without `keys`; `renamed` maps a new name to the field it replaces (a misspelt column)."""
    out = {k: v for k, v in r.items() if k not in keys and k not in renamed.values()}
    out.update({new: r[old] for new, old in renamed.items()})
    return out


def jsonl_text(*rows: Any) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


# ---------------------------------------------------------------- data files, through load_medmcqa


@dataclass
class BadData:
    kind: str
    name: str  # file name to write
    content: str | bytes | None  # None: no file; "DIR": a directory
    message: tuple[str, ...]  # fragments; "{path}" stands for the file
    kept: int | None = None  # rows left with skip_invalid=True; None: the whole file is refused anyway
    cop_base: str = "auto"


def jsonl_case(kind: str, *rows: Any, message: tuple[str, ...], kept: int | None = 2, **kw) -> BadData:
    return BadData(kind, "data.jsonl", jsonl_text(*rows), message, kept, **kw)


LATIN1_LINE_2 = (jsonl_text(row(1)) + json.dumps(row(2)).replace("Question", "Qu\u00e9s") + "\n"
                 + jsonl_text(row(3))).encode().replace(b"\xc3\xa9", b"\xe9")  # one byte of Latin-1 on line 2

DATA_CASES = [
    jsonl_case("missing-field", row(1), without(row(2), "opc"), row(3),
               message=("{path}:2: field 'opc': missing",)),
    jsonl_case("misspelt-field", row(1), without(row(2), quesiton="question"), row(3),
               message=("{path}:2: field 'question': missing (the row has 'quesiton': misspelt?)",)),
    jsonl_case("option-wrong-type", row(1), row(2, opa=5), row(3),
               message=("{path}:2: field 'opa': must be a string, got int",)),
    jsonl_case("cop-as-string", row(1), row(2, cop="4"), row(3),
               message=("{path}:2: field 'cop': must be an integer, got str '4'",)),
    jsonl_case("cop-as-bool", row(1), row(2, cop=True), row(3),
               message=("{path}:2: field 'cop': must be an integer, got bool True",)),
    jsonl_case("cop-fractional", row(1), row(2, cop=2.5), row(3),
               message=("{path}:2: field 'cop': must be an integer, got float 2.5",)),
    jsonl_case("cop-nan", row(1), json.dumps(row(2, cop=float("nan"))), row(3),
               message=("{path}:2: field 'cop': must be an integer, got float nan",)),
    jsonl_case("optional-field-wrong-type", row(1), row(2, subject_name={"name": "Anatomy"}), row(3),
               message=("{path}:2: field 'subject_name': must be a string or null, got dict",)),
    jsonl_case("cop-out-of-range", row(1), row(2, cop=7), row(3),
               message=("{path}:2: field 'cop': 7 is outside 1-4",)),
    jsonl_case("cop-zero-under-cop_base-1", row(1), row(2, cop=0), row(3), cop_base="1",
               message=("{path}:2: field 'cop': 0 is outside 1-4 (official; set by cop_base)",)),
    jsonl_case("cop-numbering-ambiguous", row(1, cop=1), row(2, cop=2), row(3, cop=3), kept=None,
               message=("{path}: field 'cop' only holds values in 1-3", "--cop_base")),
    jsonl_case("cop-numbering-mixed", row(1, cop=4), row(2, cop=0), row(3, cop=2), kept=None,
               message=("{path}: field 'cop' mixes 0 and 4", "cop 0 first on line 2, cop 4 first on line 1")),
    jsonl_case("question-empty", row(1), row(2, question=""), row(3),
               message=("{path}:2: field 'question': is empty",)),
    jsonl_case("question-whitespace-only", row(1), row(2, question=" \t  "), row(3),
               message=("{path}:2: field 'question': is empty",)),
    jsonl_case("question-invisible-characters-only", row(1), row(2, question="\u200b\u2060\u200b"), row(3),
               message=("{path}:2: field 'question': is empty once control and format characters are removed",)),
    jsonl_case("question-null", row(1), row(2, question=None), row(3),
               message=("{path}:2: field 'question': is null",)),
    jsonl_case("option-empty", row(1), row(2, opb=""), row(3),
               message=("{path}:2: field 'opb': is empty",)),
    jsonl_case("option-null", row(1), row(2, opd=None), row(3),
               message=("{path}:2: field 'opd': is null",)),
    jsonl_case("options-identical", row(1), row(2, opa="same", opb="Same", opc="same.", opd="same"), row(3),
               message=("{path}:2: field 'opa-opd': all four options are identical",)),
    jsonl_case("correct-option-repeated", row(1), row(2, opa="delta 2"), row(3),
               message=("{path}:2: field 'opd': the correct option (D) has the same text as option A; "
                        "the answer is ambiguous",)),
    jsonl_case("duplicate-id", row(1), row(2, id="r1"), row(3),
               message=("{path}:2: field 'id': duplicate id 'r1' (first on line 1)",)),
    jsonl_case("duplicate-question-conflicting-answer", row(1), row(1, id="x1", cop=2), row(3),
               message=("{path}:2: field 'cop': same question and options as line 1 but a different answer "
                        "(B vs D)",)),
    jsonl_case("truncated-json", row(1), '{"question": "Question 2: which nerve', row(3),
               message=("{path}:2: field '-': not valid JSON",)),
    jsonl_case("line-is-an-array", row(1), "[1, 2]", row(3),
               message=("{path}:2: field '-': row is a list, not an object",)),
    jsonl_case("line-is-a-string", row(1), '"a question"', row(3),
               message=("{path}:2: field '-': row is a str, not an object",)),
    jsonl_case("line-is-null", row(1), "null", row(3),
               message=("{path}:2: field '-': row is a null, not an object",)),
    jsonl_case("bad-row-after-blank-lines", row(1), "", "   ", row(4, opb=None), row(5),
               message=("{path}:4: field 'opb': is null",)),
    jsonl_case("enormous-field", row(1), row(2, question="x" * 30_000), row(3),
               message=("{path}:2: field 'question': is 30,000 characters long (limit 20,000)",)),
    BadData("invalid-utf8-line", "data.jsonl", LATIN1_LINE_2,
            ("{path}:2: field '-': not valid UTF-8 (byte %d of the file" % LATIN1_LINE_2.index(b"\xe9"),), kept=2),
    BadData("invalid-utf8-csv", "data.csv", CSV_HEADER.encode() + b"Q caf\xe9?,a,b,c,d,4,Anatomy\n",
            ("{path}:2: not valid UTF-8", "save the file as UTF-8")),
    jsonl_case("json-nested-very-deep", row(1), '{"question": ' + "[" * 100_000 + "]" * 100_000 + "}", row(3),
               message=("{path}:2: field '-': not valid JSON (nested too deeply)",)),
    jsonl_case("json-integer-with-thousands-of-digits", row(1), json.dumps(row(2))[:-1] + ', "cop2": ' + "9" * 5000
               + "}", row(3), message=("{path}:2: field '-': not valid JSON (Exceeds the limit (4300 digits)",)),
    jsonl_case("lone-surrogate-escape", row(1), json.dumps(row(2)).replace("Question 2", "Question \\ud800"), row(3),
               message=("{path}:2: field 'question': holds a lone surrogate",)),
    jsonl_case("lone-surrogate-in-an-optional-field", row(1), json.dumps(row(2, id="r\udfff2")), row(3),
               message=("{path}:2: field 'id': holds a lone surrogate",)),
    jsonl_case("u2028-and-u0085-inside-strings-are-not-line-breaks", row(1, question="Q 1\u2028part two\u0085three?"),
               row(2, opa=None), row(3), message=("{path}:2: field 'opa': is null",)),
    jsonl_case("json-duplicate-key", row(1), json.dumps(row(2, cop=2))[:-1] + ', "cop": 3}', row(3),
               message=("{path}:2: field 'cop': is given twice in this row",)),
    BadData("json-array-duplicate-key", "data.json",
            "[\n" + ",\n".join([json.dumps(row(1)), json.dumps(row(2))[:-1] + ', "opa": "x"}', json.dumps(row(3))])
            + "\n]\n", ("{path}:3: field 'opa': is given twice in this row",), kept=2),
    BadData("csv-field-over-the-csv-module-limit", "data.csv",
            CSV_HEADER + "Q one?,a,b,c,d,4,Anatomy\n" + "x" * 200_000 + ",a,b,c,d,4,Anatomy\nQ three?,a,b,c,d,1,X\n",
            ("{path}:3: field 'question': is 200,000 characters long (limit 20,000)",), kept=2),
    BadData("csv-multi-line-row-reported-by-its-first-line", "data.csv",
            CSV_HEADER + 'Q one?,a,b,c,d,4,Anatomy\n"Q two,\nspread over\nthree lines?",a,b,c,d,9,Anatomy\n'
            "Q three?,a,b,c,d,1,X\n", ("{path}:3: field 'cop': '9' is outside 1-4",), kept=2),
    BadData("csv-duplicated-column", "data.csv", "question,opa,opb,opc,opd,cop,cop\nQ?,a,b,c,d,4,1\n",
            ("{path}:1: CSV header repeats column(s) ['cop']",)),
    BadData("symlink-loop", "data.jsonl", "LOOP", ("{path}: a symbolic link loop",)),
    BadData("dangling-symlink", "data.jsonl", "DANGLING", ("{path}: a symbolic link to a file that does not exist",)),
    BadData("named-pipe", "data.jsonl", "FIFO", ("{path}: is a named pipe (FIFO), not a regular file",)),
    BadData("utf16-file", "data.jsonl", jsonl_text(row(1)).encode("utf-16"),
            ("{path}:1: not valid UTF-8", "UTF-16 byte-order mark")),
    BadData("empty-file", "data.jsonl", b"", ("{path}: file is empty",)),
    BadData("blank-lines-only", "data.jsonl", "\n   \n\n", ("{path}: file is empty",)),
    BadData("missing-file", "data.jsonl", None, ("{path}: no such file",)),
    BadData("path-is-a-directory", "data", "DIR", ("{path}: is a directory",)),
    BadData("unknown-file-type", "data.txt", jsonl_text(row(1)), ("{path}: unknown file type '.txt'",)),
    BadData("csv-missing-columns", "data.csv", "question,opa,opb\nQ?,a,b\n",
            ("{path}:1: CSV header lacks column(s) ['opc', 'opd', 'cop']",)),
    BadData("csv-unquoted-comma", "data.csv",
            CSV_HEADER + "Q one?,a,b,c,d,4,Anatomy\nWhich of a, b holds?,a,b,c,d,4,Anatomy\nQ three?,a,b,c,d,1,X\n",
            ("{path}:3: field '-': has 8 cells but the header has 7 (an unquoted comma or quote?)",), kept=2),
    BadData("csv-short-row", "data.csv", CSV_HEADER + "Q one?,a,b,c,d,4,Anatomy\nQ two?,a,b\nQ three?,a,b,c,d,1,X\n",
            ("{path}:3: field '-': has 3 cells but the header has 7",), kept=2),
    BadData("json-array-truncated", "data.json", "[\n" + json.dumps(row(1)) + ",\n" + json.dumps(row(2))[:40] + "\n",
            ("{path}:3: not valid JSON",)),
    BadData("json-array-bad-element", "data.json",
            "[\n" + ",\n".join(json.dumps(r) for r in (row(1), row(2), row(3, opa=None))) + "\n]\n",
            ("{path}:4: field 'opa': is null",), kept=2),
    BadData("json-array-on-one-line-without-ids", "data.json",  # found by test_fuzz: ids from line numbers collided
            json.dumps([without(row(1), "id"), without(row(2), "id"), without(row(3, opa=None), "id")]),
            ("{path}:1 (element 3): field 'opa': is null",), kept=2),
    BadData("one-json-object", "data.json", json.dumps({"data": [row(1), row(2)]}, indent=2),
            ("{path}:1: the file is one JSON object (keys ['data']), not one row per line",)),
    BadData("corrupt-parquet", "data.parquet", b"PAR1 this is not a parquet file", ("{path}: cannot read Parquet",)),
]


def write_case(case: BadData, directory: Path) -> Path:
    path = directory / case.name
    if case.content == "DIR":
        path.mkdir()
    elif case.content == "LOOP":
        path.symlink_to(path.name)
    elif case.content == "DANGLING":
        path.symlink_to("nowhere.jsonl")
    elif case.content == "FIFO":
        os.mkfifo(path)
    elif isinstance(case.content, bytes):
        path.write_bytes(case.content)
    elif case.content is not None:
        path.write_text(case.content, encoding="utf-8")
    return path


@pytest.mark.parametrize("case", DATA_CASES, ids=lambda c: c.kind)
def test_bad_data_names_file_line_and_field(case, tmp_path):
    path = write_case(case, tmp_path)
    fragments = [f.replace("{path}", str(path)) for f in case.message]
    with pytest.raises(DataError) as err:
        load_medmcqa(str(path), cop_base=case.cop_base)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
    if case.kept is None:  # a file-level problem: --skip_invalid cannot make it usable, and says so
        with pytest.raises(DataError) as again:
            load_medmcqa(str(path), cop_base=case.cop_base, skip_invalid=True)
        assert fragments[0] in str(again.value)
        return
    # --skip_invalid: the bad row is reported (same line, field and reason), every other row is kept unchanged
    rows, report = load_medmcqa(str(path), cop_base=case.cop_base, skip_invalid=True)
    assert len(report.issues) == 1 and fragments[0] in str(report.issues[0]), (report.issues, fragments)
    assert len(rows) == case.kept and all(str(r["line"]) != str(report.issues[0].line) for r in rows)
    records = [json.loads(line) for line in write_skipped(report, tmp_path / "out").read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in records] == [(report.issues[0].line, report.issues[0].field)]


# ---------------------------------------------------------------- accepted on purpose, and said so


def _bom_jsonl(tmp: Path) -> None:
    plain, bom = tmp / "plain.jsonl", tmp / "bom.jsonl"
    plain.write_text(jsonl_text(row(1), row(2)), encoding="utf-8")
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    strip = lambda rows: [{k: v for k, v in r.items() if k != "source"} for r in rows]  # noqa: E731
    assert strip(load_medmcqa(str(bom))[0]) == strip(load_medmcqa(str(plain))[0])


def _bom_csv(tmp: Path) -> None:
    path = tmp / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (CSV_HEADER + "Q one?,a,b,c,d,4,Anatomy\nQ two?,a,b,c,d,1,Anatomy\n").encode())
    rows, _ = load_medmcqa(str(path))
    assert [(r["question"], r["cop"], r["line"]) for r in rows] == [("Q one?", 3, 2), ("Q two?", 0, 3)]


def _blank_lines(tmp: Path) -> None:
    path = tmp / "blank.jsonl"
    path.write_text(jsonl_text(row(1), "", "  ", row(4)), encoding="utf-8")
    rows, report = load_medmcqa(str(path))
    assert [r["line"] for r in rows] == [1, 4] and report.rows_read == 2 and not report.issues


def _extra_fields(tmp: Path) -> None:
    path = tmp / "extra.jsonl"
    path.write_text(jsonl_text(row(1, answer_idx=3, source_url="x"), row(2)), encoding="utf-8")
    rows, report = load_medmcqa(str(path))
    assert len(rows) == 2 and "answer_idx" not in rows[0]
    assert "ignored fields: answer_idx (1 rows), source_url (1 rows)" in report.summary()


def _exact_duplicates(tmp: Path) -> None:
    path = tmp / "dup.jsonl"
    path.write_text(jsonl_text(row(1), row(1, id="r1-again"), row(3)), encoding="utf-8")
    rows, report = load_medmcqa(str(path))
    assert [r["id"] for r in rows] == ["r1", "r3"] and "1 exact duplicates removed" in report.summary()
    rows, report = load_medmcqa(str(path), evaluation=True)  # lm-eval scores every row: kept, counted
    assert len(rows) == 3 and "1 rows repeat an earlier question and options (kept)" in report.summary()


@pytest.mark.parametrize("check", [_bom_jsonl, _bom_csv, _blank_lines, _extra_fields, _exact_duplicates],
                         ids=["utf8-bom-jsonl", "utf8-bom-csv", "blank-lines", "extra-fields", "exact-duplicates"])
def test_accepted_input_is_reported_not_silently_changed(check, tmp_path):
    check(tmp_path)


# ---------------------------------------------------------------- the CLI, in-process


def assert_refused(code, err: str, fragments) -> None:
    assert code == 2, f"exit {code}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert err.count("medlora: error: ") == 1, err[-3000:]  # one message
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in:\n{err[-3000:]}"


@dataclass
class Ctx:
    tmp: Path
    tiny: Path
    adapters: dict[str, Path] = field(default_factory=dict)

    def jsonl(self, *rows: Any, name: str = "data.jsonl") -> Path:
        path = self.tmp / name
        path.write_text(jsonl_text(*rows), encoding="utf-8")
        return path

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def rows(self, n: int = 12, **bad: dict[str, Any]) -> Path:
        """n good rows; `bad` maps 'L<line>' to the changes for that line."""
        return self.jsonl(*[row(i, **bad.get(f"L{i}", {})) for i in range(1, n + 1)])

    def no_template(self) -> Path:
        """The tiny model with its tokenizer's chat template removed."""
        target = self.tmp / "no-chat-template"
        shutil.copytree(self.tiny, target)
        (target / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((target / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (target / "tokenizer_config.json").write_text(json.dumps(config))
        return target


CLI_CASES = []


def cli_case(kind: str, *marks):
    def register(build: Callable[[Ctx], tuple[list, list[str]]]):
        CLI_CASES.append(pytest.param(build, id=kind, marks=marks))
        return build

    return register


def _train(c: Ctx, *extra) -> list:
    return ["train", "--model_name_or_path", c.tiny, "--output_dir", c.tmp / "run", "--report_to", "none", *extra]


# prepare
@cli_case("prepare-bad-row")
def prepare_bad_row(c):
    data = c.rows(L2={"opb": ""})
    return (["prepare", "--data", data, "--output_dir", c.tmp / "out", "--model_name_or_path", c.tiny],
            [f"{data}:2: field 'opb': is empty", "--skip_invalid"])


@cli_case("prepare-missing-data-file")
def prepare_missing_file(c):
    return (["prepare", "--data", c.tmp / "nope.jsonl", "--output_dir", c.tmp / "out"],
            [f"{c.tmp / 'nope.jsonl'}: no such file"])


@cli_case("prepare-output-dir-not-empty")
def prepare_output_not_empty(c):
    (c.tmp / "out").mkdir()
    (c.tmp / "out" / "dataset_dict.json").write_text("{}")
    return (["prepare", "--data", c.rows(), "--output_dir", c.tmp / "out", "--model_name_or_path", c.tiny],
            [f"{c.tmp / 'out'} already holds the output of medlora prepare (dataset_dict.json)", "--overwrite true"])


@cli_case("prepare-chat-style-without-chat-template")
def prepare_no_template(c):
    return (["prepare", "--data", c.rows(), "--output_dir", c.tmp / "out", "--model_name_or_path", c.no_template(),
             "--style", "chat"], ["has no chat template, so style 'chat' cannot be used", "style 'plain'"])


# train: data
@cli_case("train-mixed-cop-numbering")
def train_mixed_numbering(c):
    data = c.rows(L5={"cop": 0})
    return _train(c, "--data", data), [f"{data}: field 'cop' mixes 0 and 4", "first on line 5"]


@cli_case("train-empty-data-file")
def train_empty_file(c):
    data = c.file("empty.jsonl", "")
    return _train(c, "--data", data), [f"{data}: file is empty"]


@cli_case("train-question-in-train-and-eval-files")
def train_leak(c):
    train, evaluation = c.rows(), c.jsonl(row(7, id="e7"), row(20, id="e20"), name="eval.jsonl")
    return (_train(c, "--data", train, "--eval_data_path", evaluation),
            ["1 questions leak between splits", f"{evaluation}:1 (eval) repeats a question of split 'train'"])


@cli_case("train-all-examples-longer-than-max_length")
def train_all_too_long(c):
    data = c.rows()
    return _train(c, "--data", data, "--max_length", "17"), ["max_length=17", f"(first: {data}:"]


# train: configuration
def _yaml(c: Ctx, text: str | bytes) -> Path:
    return c.file("config.yaml", text)


@cli_case("config-unknown-key")
def config_unknown_key(c):
    cfg = _yaml(c, "lora_alpah: 16\n")
    return _train(c, "--config", cfg), [f"{cfg}: unknown key 'lora_alpah' (did you mean 'lora_alpha'?)"]


@cli_case("config-wrong-value-type")
def config_wrong_type(c):
    cfg = _yaml(c, "lora_dropout: high\n")
    return _train(c, "--config", cfg), [f"{cfg}: argument --lora_dropout", "invalid float value: 'high'"]


@cli_case("config-not-a-boolean")
def config_not_bool(c):
    cfg = _yaml(c, "skip_invalid: maybe\n")
    return _train(c, "--config", cfg), [f"{cfg}: argument --skip_invalid", "got maybe"]


@cli_case("config-list-for-a-single-value")
def config_list(c):
    cfg = _yaml(c, "max_steps: [10, 20]\n")
    return _train(c, "--config", cfg), [f"{cfg}: key 'max_steps' takes a single value, got a list [10, 20]"]


@cli_case("config-mapping-for-a-single-value")
def config_mapping(c):
    cfg = _yaml(c, "data_path: {train: a.jsonl}\n")
    return _train(c, "--config", cfg), [f"{cfg}: key 'data_path' takes a single value, got a dict"]


@cli_case("config-key-given-twice")
def config_duplicate_key(c):
    cfg = _yaml(c, "max_steps: 10\nlora_r: 4\nmax_steps: 20\n")
    return _train(c, "--config", cfg), [f"{cfg}:3: key 'max_steps' is given twice (first on line 1)"]


@cli_case("config-invalid-yaml")
def config_invalid_yaml(c):
    cfg = _yaml(c, "max_steps: [1, 2\n")
    return _train(c, "--config", cfg), [f"{cfg}: not valid YAML"]


@cli_case("config-not-utf8")
def config_not_utf8(c):
    cfg = _yaml(c, b"style: caf\xe9\n")
    return _train(c, "--config", cfg), [f"{cfg}: not UTF-8 text"]


@cli_case("config-not-a-mapping")
def config_list_file(c):
    cfg = _yaml(c, "- max_steps\n- 10\n")
    return _train(c, "--config", cfg), [f"{cfg}: must be a YAML mapping of option: value, got list"]


@cli_case("config-path-does-not-exist")
def config_missing(c):
    return (["eval", "--config", c.tmp / "nope.yaml", "--output_dir", c.tmp / "ev"],
            [f"config file {c.tmp / 'nope.yaml'} does not exist"])


@cli_case("config-path-is-a-directory")
def config_dir(c):
    return (["prepare", "--config", c.tmp, "--output_dir", c.tmp / "out"],
            [f"config file {c.tmp} is a directory, not a YAML file"])


@cli_case("config-flag-without-path")
def config_no_path(c):
    return ["train", "--config"], ["--config needs a file path"]


# train: flags
@cli_case("flag-unknown")
def flag_unknown(c):
    return _train(c, "--lerning_rate", "0.1"), ["command line: unknown option --lerning_rate (did you mean "
                                               "--learning_rate?)"]


@cli_case("flag-wrong-type")
def flag_wrong_type(c):
    return _train(c, "--max_steps", "ten"), ["command line: argument --max_steps", "invalid int value: 'ten'"]


@cli_case("flag-too-many-values")
def flag_two_values(c):
    return _train(c, "--max_steps", "3", "4"), ["command line: unexpected value(s) ['4']"]


@cli_case("flag-impossible-value")
def flag_impossible(c):
    return _train(c, "--eval_fraction", "1.5"), ["--eval_fraction must be in (0, 1), got 1.5"]


@cli_case("command-unknown")
def unknown_command(c):
    return ["trian", "--max_steps", "3"], ["unknown command 'trian'; commands: train"]


@cli_case("train-output-dir-holds-a-run")
def train_output_holds_run(c):
    (c.tmp / "run").mkdir()
    (c.tmp / "run" / "metrics.json").write_text("{}")
    return (_train(c, "--data", c.rows()),
            [f"{c.tmp / 'run'} already holds a run (metrics.json)", "--overwrite", "--resume_from_checkpoint auto"])


# train: backends and hardware
@cli_case("train-backend-unsloth-without-cuda", no_cuda)
def train_unsloth(c):
    return _train(c, "--backend", "unsloth"), ["--backend unsloth needs an NVIDIA GPU", "use --backend hf"]


@cli_case("train-4bit-hf")
def train_4bit(c):
    return _train(c, "--data", c.rows(), "--load_in_4bit", "true"), [
        "--load_in_4bit with --backend 'hf'", "quantise only the nn.Linear layers", "run with --backend fast"]


@cli_case("train-unknown-backend")
def train_unknown_backend(c):
    return _train(c, "--backend", "jax"), ["--backend must be one of ('hf', 'unsloth', 'fast'), got 'jax'"]


# eval / ask: adapters, models, options
def _eval(c: Ctx, *extra, data: Path | None = None) -> list:
    return ["eval", "--model_name_or_path", c.tiny, "--data", data or c.rows(5), "--output_dir", c.tmp / "ev",
            "--limit", "2", *extra]


def _ask(c: Ctx, *extra, question: str = "Which nerve supplies the deltoid?") -> list:
    return ["ask", question, "--options", "Radial", "Axillary", "Ulnar", "Median", "--max_new_tokens", "1", *extra]


@cli_case("eval-adapter-with-other-shapes")
def eval_adapter_shapes(c):
    adapter = c.adapters["other-shapes"]
    return _eval(c, "--adapter", adapter), [f"--adapter {adapter} does not fit", "size mismatch for"]


@cli_case("eval-adapter-for-another-base-model")
def eval_adapter_other_base(c):
    adapter = c.adapters["other-base"]
    return (_eval(c, "--adapter", adapter),
            [f"--adapter {adapter} was trained on", "a different model (medlora_model.json differs in seed)",
             "base_model_name_or_path"])


@cli_case("ask-adapter-for-another-hub-model")
def ask_adapter_other_hub(c):
    adapter = c.adapters["hub-base"]
    return (_ask(c, "--adapter", adapter, "--model_name_or_path", HUB_OTHER),
            [f"was trained on '{HUB_BASE}', but --model_name_or_path is '{HUB_OTHER}': a different hub model"])


@cli_case("ask-adapter-dir-without-adapter-config")
def ask_adapter_missing(c):
    return (_ask(c, "--adapter", c.tmp, "--model_name_or_path", c.tiny),
            [f"--adapter {c.tmp}: no adapter_config.json there"])


@cli_case("ask-chat-style-without-chat-template")
def ask_no_template(c):
    return (_ask(c, "--model_name_or_path", c.no_template(), "--style", "chat"),
            ["has no chat template, so style 'chat' cannot be used"])


@cli_case("ask-empty-question")
def ask_empty_question(c):
    return _ask(c, "--model_name_or_path", c.tiny, question="  "), ["field 'question': is empty"]


@cli_case("ask-three-options")
def ask_three_options(c):
    return ["ask", "Which nerve?", "--options", "a", "b", "c"], ["--options: expected 4 arguments"]


@cli_case("inspect-num_examples-not-a-number")
def inspect_bad_number(c):
    return ["inspect", "--num_examples", "three", "--data", c.rows()], ["--num_examples"]


@cli_case("eval-negative-limit")
def eval_negative_limit(c):
    return _eval(c, "--limit", "-5"), ["--limit must be positive, got -5"]


@cli_case("eval-compare-base-without-adapter")
def eval_compare_base(c):
    return _eval(c, "--compare_base", "true"), ["--compare_base", "pass --adapter DIR too"]


@cli_case("eval-output-dir-holds-predictions")
def eval_output_exists(c):
    (c.tmp / "ev").mkdir()
    (c.tmp / "ev" / "summary.json").write_text("{}")
    return _eval(c), [f"{c.tmp / 'ev'} already holds the output of medlora eval (summary.json); pass --overwrite"]


@cli_case("eval-bad-row")
def eval_bad_row(c):
    data = c.rows(5, L2={"opc": None})
    return _eval(c, data=data), [f"{data}:2: field 'opc': is null", "--skip_invalid"]


@cli_case("eval-local-model-dir-missing")
def eval_model_dir_missing(c):
    missing = c.tmp / "models" / "nano"
    return (["eval", "--model_name_or_path", missing, "--data", c.rows(5), "--output_dir", c.tmp / "ev"],
            [f"--model_name_or_path {missing}: no such directory"])


# bench
def _bench(c: Ctx, *extra) -> list:
    return ["bench", "--model_cache_dir", c.tmp / "models", "--results_dir", c.tmp / "results", *extra]


@cli_case("bench-missing-data-file")
def bench_missing_data(c):
    return _bench(c, "--data_path", c.tmp / "dev.jsonl"), [f"{c.tmp / 'dev.jsonl'}: no such file"]


@cli_case("bench-bad-row")
def bench_bad_row(c):
    data = c.rows(L2={"cop": "D"})
    return _bench(c, "--data_path", data), [f"{data}:2: field 'cop': must be an integer, got str 'D'"]


@cli_case("bench-unknown-backend")
def bench_unknown_backend(c):
    return _bench(c, "--backends", "hf", "jax"), ["--backends: unknown backend 'jax'"]


@cli_case("bench-unsloth-without-cuda", no_cuda)
def bench_unsloth(c):
    return _bench(c, "--backends", "unsloth"), ["--backends unsloth needs an NVIDIA GPU"]


@cli_case("bench-unknown-model-spec")
def bench_unknown_spec(c):
    return (_bench(c, "--model_spec", "nano-half", "--data_path", SAMPLE),
            ["--model_spec must be tiny, a local model dir, or one of ['nano-full', 'nano-quarter']; got 'nano-half'"])


@cli_case("bench-zero-steps")
def bench_zero_steps(c):
    return _bench(c, "--bench_steps", "0"), ["--bench_steps must be a whole number from 1 to 100,000, got 0"]


@cli_case("train-unknown-fast-checkpoint-block")
def train_unknown_ckpt_block(c):
    return (_train(c, "--backend", "fast", "--fast_checkpoint_blocks", "moe", "ffn"),
            ["--fast_checkpoint_blocks: unknown ['ffn']; choose from ('mamba', 'attention', 'moe', 'mlp')"])


@cli_case("train-fsdp2-without-torchrun")
def train_fsdp2_single(c):
    return _train(c, "--fsdp2", "true"), ["--fsdp2 needs a distributed launch: torchrun --nproc_per_node=N"]


@cli_case("train-fsdp2-with-backend-fast")
def train_fsdp2_fast(c):
    return _train(c, "--fsdp2", "true", "--backend", "fast"), ["--fsdp2: backend 'fast' is not supported with FSDP2"]


@cli_case("bench-checkpoint-blocks-for-hf")
def bench_ckpt_blocks_hf(c):
    return (_bench(c, "--data_path", SAMPLE, "--backend_gradient_checkpointing", "hf=moe"),
            ["--backend_gradient_checkpointing hf=moe: block kinds (selective checkpointing) are for fast backends"])


@cli_case("bench-loss-positions-beyond-step")
def bench_loss_positions(c):
    return (["bench-loss", "--positions", "9000", "--results_dir", c.tmp / "results"],
            ["--positions: each must be in 1..--step_tokens (6500), got [9000]"])


@cli_case("bench-config-key-of-another-command")
def bench_config_key(c):
    cfg = _yaml(c, "model_name_or_path: tiny\n")
    return _bench(c, "--config", cfg), [f"{cfg}: unknown key 'model_name_or_path'"]


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """PEFT adapters that do not fit the tiny model: other widths, another (same-shaped) base, another hub id."""
    from peft import get_peft_model
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from medlora.config import LoraArguments
    from medlora.model import lora_config, tiny_config_dict

    root = tmp_path_factory.mktemp("adapters")
    other_base = root / "tiny-seed-1"  # the tiny model built with another seed: same shapes, other weights
    other_base.mkdir()
    shutil.copy(tiny_dir / "config.json", other_base / "config.json")
    stamp = json.loads((tiny_dir / "medlora_model.json").read_text())
    (other_base / "medlora_model.json").write_text(json.dumps({**stamp, "seed": stamp["seed"] + 1}))
    made = {}
    for name, base, overrides in (("other-shapes", str(tiny_dir), {"moe_shared_expert_intermediate_size": 96}),
                                  ("other-base", str(other_base), {}), ("hub-base", HUB_BASE, {})):
        with torch.random.fork_rng():
            model = NemotronHForCausalLM(NemotronHConfig(**tiny_config_dict(**overrides)))
            peft_model = get_peft_model(model, lora_config(LoraArguments(lora_r=4)))
        peft_model.save_pretrained(root / name)
        config_path = root / name / "adapter_config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": base}))
        made[name] = root / name
    return made


@pytest.mark.parametrize("build", CLI_CASES)
def test_cli_refuses_with_one_clear_message(build, tmp_path, tiny_dir, adapters, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # rich wraps at 80 columns when not on a terminal
    args, fragments = build(Ctx(tmp_path, tiny_dir, adapters))
    code, _, err = run_main(args, capsys)
    assert_refused(code, err, fragments)


# ---------------------------------------------------------------- the CLI: reported skips and counts


def test_prepare_skip_invalid_writes_skipped_jsonl_and_prints_the_count(tmp_path, tiny_dir, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    data = Ctx(tmp_path, tiny_dir).rows(12, L2={"opb": ""}, L5={"cop": 9})
    out = tmp_path / "prepared"
    code, stdout, err = run_main(["prepare", "--data", data, "--output_dir", out, "--model_name_or_path", tiny_dir,
                                  "--skip_invalid", "true"], capsys)
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert "2 invalid rows skipped" in stdout and f"{data}:2: field 'opb': is empty" in stdout
    records = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in records] == [(2, "opb"), (5, "cop")]
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert summary["invalid_skipped"] == 2 and sum(s["rows"] for s in summary["splits"].values()) == 10


def test_eval_skip_invalid_writes_skipped_jsonl_and_scores_every_valid_row(tmp_path, tiny_dir, capsys,
                                                                          monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    data = Ctx(tmp_path, tiny_dir).rows(5, L3={"question": None})
    out = tmp_path / "eval"
    code, stdout, err = run_main(["eval", "--model_name_or_path", tiny_dir, "--data", data, "--output_dir", out,
                                  "--skip_invalid", "true", "--bootstrap_samples", "0"], capsys)
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert "1 rows skipped (see skipped.jsonl)" in stdout and f"{data}:3: field 'question': is null" in stdout
    assert [json.loads(line)["line"] for line in (out / "skipped.jsonl").read_text().splitlines()] == [3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_invalid"] == 1 and summary["n"] == 4  # every valid row scored


def test_train_reports_sequences_longer_than_max_length_with_a_count(tmp_path, tiny_dir, capsys, monkeypatch):
    """Over-long examples are left out and counted (file:line named), never cut to max_length."""
    monkeypatch.setenv("COLUMNS", "400")
    long = "Which of the following statements about the brachial plexus and its branches is true? " * 6
    data = Ctx(tmp_path, tiny_dir).rows(20, L4={"question": long}, L9={"question": long.replace("true", "false")})
    out = tmp_path / "run"
    code, stdout, err = run_main(_train(Ctx(tmp_path, tiny_dir), "--data", data, "--max_length", "150",
                                        "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
                                        "--audit", "false", "--eval_accuracy_samples", "2", "--disable_tqdm", "true",
                                        "--per_device_train_batch_size", "2", "--lora_r", "2",
                                        "--eval_fraction", "0.2"), capsys)
    assert code == 0 and "Traceback" not in err, err[-3000:]
    reported = re.findall(r"(\d+) (train|eval) examples exceed max_length=150 tokens and are left out "
                          r"\(first: ([^ ]+):(\d+) \((\d+) tokens\)", stdout)
    assert sum(int(n) for n, *_ in reported) == 2, stdout[-3000:]
    assert all(path == str(data) and int(line) in (4, 9) and int(tokens) > 150
               for _, _, path, line, tokens in reported)
    metrics = json.loads((out / "metrics.json").read_text())
    assert sum(metrics["skipped_too_long"].values()) == 2
    assert metrics["train_examples"] + metrics["eval_examples"] == 18  # the other rows all trained/evaluated


# ---------------------------------------------------------------- fresh processes (started at module start)


@pytest.fixture(scope="module", autouse=True)
def offline_runs(tmp_path_factory):
    """The hub id with HF_HUB_OFFLINE=1: `scripts/train_multigpu.py` and `medlora eval`, each in its own process."""
    tmp = tmp_path_factory.mktemp("offline")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    commands = {
        "train_multigpu": [sys.executable, "scripts/train_multigpu.py", "--model_name_or_path", HUB_BASE,
                           "--output_dir", str(tmp / "run"), "--data_path", str(SAMPLE), "--report_to", "none"],
        "eval": [sys.executable, "-m", "medlora.cli", "eval", "--model_name_or_path", HUB_BASE, "--data", str(SAMPLE),
                 "--output_dir", str(tmp / "eval")],
    }
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, cmd in commands.items()}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("name", ["train_multigpu", "eval"])
def test_hub_id_offline_says_so_and_how_to_use_a_local_dir(offline_runs, name):
    _, err = offline_runs[name].communicate(timeout=300)
    assert_refused(offline_runs[name].returncode, err,
                   [f"cannot load '{HUB_BASE}'", "HF_HUB_OFFLINE=1 is set",
                    f"hf download {HUB_BASE} --local-dir DIR", "pass --model_name_or_path DIR"])
