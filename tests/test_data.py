import json

import pytest

from conftest import SAMPLE
from medlora.data import (DataError, check_leakage, detect_cop_base, load_medmcqa, normalise_key, split_rows,
                          write_skipped)

GOOD = {"question": "Q{i} about the liver?", "opa": "a{i}", "opb": "b{i}", "opc": "c{i}", "opd": "d{i}",
        "cop": 4, "subject_name": "Medicine", "exp": None, "id": "r{i}"}


def row(i, **changes):
    r = {k: (v.format(i=i) if isinstance(v, str) else v) for k, v in GOOD.items()}
    r.update(changes)
    return r


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_sample_data_loads_with_official_numbering():
    rows, report = load_medmcqa(str(SAMPLE))
    assert len(rows) >= 60 and len({r["subject_name"] for r in rows}) >= 10
    assert report.cop_numbering.startswith("1-4") and not report.issues
    assert {r["cop"] for r in rows} == {0, 1, 2, 3}  # normalised to 0-3


def test_cop_numbering_is_explicit():
    assert detect_cop_base([1, 2, 4], "f", "auto")[0] == 1
    assert detect_cop_base([0, 2, 3], "f", "auto")[0] == 0
    with pytest.raises(DataError, match="cannot tell"):
        detect_cop_base([1, 2, 3], "f", "auto")
    with pytest.raises(DataError, match="mixes 0 and 4"):
        detect_cop_base([0, 4], "f", "auto")
    assert detect_cop_base([1, 2, 3], "f", "0")[0] == 0


def test_strict_errors_name_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [row(1), row(2, opb=""), '{"question": "trunc', row(4, cop="x"),
                                                 "[1, 2]", row(6)])
    with pytest.raises(DataError) as err:
        load_medmcqa(str(path))
    text = str(err.value)
    assert f"{path}:2: field 'opb': is empty" in text
    assert f"{path}:3: field '-': not valid JSON" in text
    assert f"{path}:4: field 'cop': must be an integer" in text
    assert f"{path}:5: field '-': row is a list" in text
    assert "--skip_invalid" in text


def test_skip_invalid_reports_every_skipped_row(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [row(1), row(2, question=None), row(3), row(4, cop=7)])
    rows, report = load_medmcqa(str(path), skip_invalid=True)
    assert [r["id"] for r in rows] == ["r1", "r3"]
    skipped = write_skipped(report, tmp_path / "out")
    records = [json.loads(line) for line in skipped.read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in records] == [(2, "question"), (4, "cop")]


def test_bom_blank_lines_and_cleaning(tmp_path):
    path = tmp_path / "bom.jsonl"
    text = json.dumps(row(1, question="  Caf\u0065\u0301   au  lait spots? ")) + "\n\n" + json.dumps(row(2)) + "\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    rows, report = load_medmcqa(str(path))
    assert len(rows) == 2 and rows[0]["question"] == "Caf\u00e9 au lait spots?" and report.cleaned_rows == 1


def test_duplicates_removed_and_conflicts_rejected(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [row(1), row(1, id="other"), row(2)])
    rows, report = load_medmcqa(str(path))
    assert len(rows) == 2 and report.duplicates_removed == 1
    path = write_jsonl(tmp_path / "conflict.jsonl", [row(1), row(1, id="other", cop=3)])
    with pytest.raises(DataError, match="different answer"):
        load_medmcqa(str(path))


def test_ambiguous_correct_option_is_invalid_for_training_but_scored_in_eval(tmp_path):
    path = write_jsonl(tmp_path / "amb.jsonl", [row(1, opd="same", opa="same"), row(2)])
    with pytest.raises(DataError, match="ambiguous"):
        load_medmcqa(str(path))
    rows, report = load_medmcqa(str(path), evaluation=True)
    assert rows[0]["ambiguous"] and report.ambiguous_rows == 1


def test_csv_and_missing_columns(tmp_path):
    good = tmp_path / "ok.csv"
    good.write_text("question,opa,opb,opc,opd,cop,subject_name\nQ one?,a,b,c,d,4,Anatomy\nQ two?,a,b,c,d,1,Anatomy\n")
    rows, _ = load_medmcqa(str(good))
    assert [r["cop"] for r in rows] == [3, 0]
    bad = tmp_path / "bad.csv"
    bad.write_text("question,opa,opb\nQ?,a,b\n")
    with pytest.raises(DataError, match="lacks column"):
        load_medmcqa(str(bad))


@pytest.mark.parametrize("content,match", [("", "empty"), (None, "no such file")])
def test_empty_and_missing_files(tmp_path, content, match):
    path = tmp_path / "x.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_medmcqa(str(path))


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="openlifescienceai/medmcqa.*\n.*local"):
        load_medmcqa("openlifescienceai/medmcqa")


def test_split_is_stratified_seeded_and_leak_free():
    rows, _ = load_medmcqa(str(SAMPLE))
    a = split_rows(rows, 0.2, seed=7)
    b = split_rows(rows, 0.2, seed=7)
    assert [r["id"] for r in a["eval"]] == [r["id"] for r in b["eval"]]
    assert {r["subject_name"] for r in a["eval"]} == {r["subject_name"] for r in rows}  # every subject held out
    assert len(a["train"]) + len(a["eval"]) == len(rows)


def test_leakage_check_fails_loudly():
    rows, _ = load_medmcqa(str(SAMPLE))
    twin = dict(rows[0], question=rows[0]["question"].upper() + "  ", line=999)
    with pytest.raises(DataError, match="leak"):
        check_leakage({"train": rows, "eval": [twin]})
    assert normalise_key("What is  X?") == normalise_key("what is x")


def test_real_dev_split_loads(dev_path):
    rows, report = load_medmcqa(str(dev_path), evaluation=True)
    assert len(rows) == 4183 and report.cop_numbering.startswith("0-3") and not report.issues
    official = dev_path.with_name("dev.jsonl")
    rows1, report1 = load_medmcqa(str(official), evaluation=True)
    assert report1.cop_numbering.startswith("1-4")
    assert [r["cop"] for r in rows1] == [r["cop"] for r in rows]  # both numberings agree after normalising
