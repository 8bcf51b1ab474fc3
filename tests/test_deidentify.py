"""medlora.deidentify and `medlora prepare --deidentify`. Every identifier here is invented."""

import json
from collections import Counter

import pytest

from conftest import SAMPLE
from medlora.deidentify import TYPES, deidentify_row, deidentify_text, deidentify_value

POSITIVE = [
    # (text, scrubbed text, placeholder type)
    ("Mail the report to a.patient-42@example.com today.", "Mail the report to [EMAIL] today.", "EMAIL"),
    ("Reach her at +44 20 7946 0958 after 6 pm.", "Reach her at [PHONE] after 6 pm.", "PHONE"),
    ("Call (555) 123-4567 for results.", "Call [PHONE] for results.", "PHONE"),
    ("Call 555-123-4567 for results.", "Call [PHONE] for results.", "PHONE"),
    ("Son's mobile 98765 43210.", "Son's mobile [PHONE].", "PHONE"),
    ("Son's mobile +91-9876543210.", "Son's mobile [PHONE].", "PHONE"),
    ("MRN: 00123456, admitted to ward 4.", "MRN: [RECORD_ID], admitted to ward 4.", "RECORD_ID"),
    ("UHID 2023/45678 was discharged.", "UHID [RECORD_ID] was discharged.", "RECORD_ID"),
    ("Patient ID A-99812 reports fever.", "Patient ID [RECORD_ID] reports fever.", "RECORD_ID"),
    ("Reg. No. 4521 of the antenatal clinic.", "Reg. No. [RECORD_ID] of the antenatal clinic.", "RECORD_ID"),
    ("IP No. 778812, day 3 of admission.", "IP No. [RECORD_ID], day 3 of admission.", "RECORD_ID"),
    ("DOB: 12/03/1985, presents with chest pain.", "DOB: [DOB], presents with chest pain.", "DOB"),
    ("D.O.B. 1985-03-12.", "D.O.B. [DOB].", "DOB"),
    ("Date of birth 12 March 1985; G2P1.", "Date of birth [DOB]; G2P1.", "DOB"),
    ("The child, born on March 12, 1985, was", "The child, born on [DOB], was", "DOB"),
    ("Lives at 22 Linking Road with her son.", "Lives at [ADDRESS] with her son.", "ADDRESS"),
    ("Resides at Flat 4B, 17 Shanti Nagar, Pune.", "Resides at [ADDRESS], Pune.", "ADDRESS"),
    ("Address: 221B Baker Street.", "Address: [ADDRESS].", "ADDRESS"),
    ("Seen by 3 Tilak Marg clinic", "Seen by [ADDRESS] clinic", "ADDRESS"),
    ("Referred by Dr. Anil Kumar for dyspnoea.", "Referred by Dr. [NAME] for dyspnoea.", "NAME"),
    ("Mrs Sunita Devi, 34, is G3P2.", "Mrs [NAME], 34, is G3P2.", "NAME"),
    ("Prof. A. K. Sharma examined her.", "Prof. [NAME] examined her.", "NAME"),
    ("Smt. Kamla Rao-Patil was counselled.", "Smt. [NAME] was counselled.", "NAME"),
    ("Master Rohan, aged 6, has a limp.", "Master [NAME], aged 6, has a limp.", "NAME"),
    ("Miss Priya D'Souza complains of itching.", "Miss [NAME] complains of itching.", "NAME"),
]

NEGATIVE = [
    "BP is 120/80 mmHg and pulse 72/min.",
    "Give 5 mg of amlodipine once daily; dose 10-15 mg/kg/day.",
    "Arterial pH 7.4, HbA1c 6.5%, Hb 9.8 g/dL, serum sodium 128 mEq/L, creatinine 1.2 mg/dL.",
    "Platelets 150,000/mm3; normal potassium 3.5-5.0 mEq/L; adrenaline 1:1000.",
    "The vaccine was introduced in 1998 and revised in 2004-2005.",
    "A 45-year-old man and a 6 year old girl present with fever.",
    "Which drug did Dr. prescribe? Dr prescribed it once. The Dr. The patient improved.",
    "Malaria resurged in Sri Lanka; a Sri Lankan study followed.",
    "Karyotype 46,XX; t(9;22) translocation; CD4 count 350 cells/uL; 2 x 10^9/L.",
    "Patient no. 3 had MS and MR; Cr: 1.2; +2 SD; in case 12345 words.",
    "Section 304-A IPC; ICD-10; 12-lead ECG; NFHS-4 (2015-16).",
    "The patient was born on a farm; DOB unknown.",
]


@pytest.mark.parametrize("text,expected,label", POSITIVE)
def test_each_type_is_replaced_with_its_placeholder_and_counted(text, expected, label):
    scrubbed, counts = deidentify_text(text)
    assert scrubbed == expected
    assert counts == Counter({label: 1})


@pytest.mark.parametrize("text", NEGATIVE)
def test_medical_numbers_ages_doses_years_and_bare_titles_are_untouched(text):
    assert deidentify_text(text) == (text, Counter())


def test_sample_questions_are_untouched():
    """72 ordinary MedMCQA-style questions: a de-identifier that changes any of them has a false positive."""
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        assert deidentify_row(row) == (row, Counter()), row["id"]


NOTE = ("Mr. Ravi Menon (MRN: 00987654, DOB 02/11/1979) of 8 Gandhi Road, reachable at ravi.m@example.org or "
        "+91 98765 01234, was seen by Dr. Meera Iyer. BP 130/85 mmHg; metformin 500 mg; HbA1c 7.1%.")


def test_a_mixed_note_counts_every_type():
    scrubbed, counts = deidentify_text(NOTE)
    assert scrubbed == ("Mr. [NAME] (MRN: [RECORD_ID], DOB [DOB]) of [ADDRESS], reachable at [EMAIL] or "
                        "[PHONE], was seen by Dr. [NAME]. BP 130/85 mmHg; metformin 500 mg; HbA1c 7.1%.")
    assert counts == Counter({"NAME": 2, "RECORD_ID": 1, "DOB": 1, "ADDRESS": 1, "EMAIL": 1, "PHONE": 1})
    assert set(counts) == set(TYPES)


@pytest.mark.parametrize("text", [NOTE, *(p[0] for p in POSITIVE), *NEGATIVE])
def test_scrubbing_twice_changes_nothing_more(text):
    once, _ = deidentify_text(text)
    assert deidentify_text(once) == (once, Counter())


def test_deidentify_row_returns_a_new_row_and_leaves_other_fields_alone():
    row = {"id": "MRN: 00123456", "question": "Dr. Anil Kumar asks: which nerve?", "opa": "Call 555-123-4567",
           "opb": "Radial", "opc": None, "opd": "Ulnar", "cop": 2, "subject_name": "Mrs Sunita Devi", "exp": None}
    original = dict(row)
    scrubbed, counts = deidentify_row(row)
    assert row == original  # not modified in place
    assert scrubbed is not row
    assert scrubbed["question"] == "Dr. [NAME] asks: which nerve?" and scrubbed["opa"] == "Call [PHONE]"
    assert scrubbed["opc"] is None and scrubbed["exp"] is None and scrubbed["cop"] == 2
    assert scrubbed["id"] == row["id"] and scrubbed["subject_name"] == row["subject_name"]  # not in `fields`
    assert counts == Counter({"NAME": 1, "PHONE": 1})
    assert deidentify_row(row, fields=("subject_name",))[0]["subject_name"] == "Mrs [NAME]"


def test_deidentify_value_reaches_nested_strings():
    value = {"a": ["MRN 1234567", {"b": "x@example.com"}], "n": 3, "z": None}
    assert deidentify_value(value) == ({"a": ["MRN [RECORD_ID]", {"b": "[EMAIL]"}], "n": 3, "z": None},
                                       Counter({"RECORD_ID": 1, "EMAIL": 1}))


# ---------------------------------------------------------------- medlora prepare --deidentify

SECRETS = ["Anil Kumar", "Sunita Devi", "ravi.m@example.org", "98765 43210", "555-123-4567", "00123456",
           "2023/45678", "12/03/1985", "22 Linking Road", "Meera Iyer", "A-99812"]


def medmcqa_rows():
    questions = [
        ("Dr. Anil Kumar notes ptosis and a dilated pupil. Which nerve is affected?", "Anatomy"),
        ("Mrs Sunita Devi (MRN: 00123456) has a wrist drop. Which nerve is injured?", "Anatomy"),
        ("A patient (DOB: 12/03/1985) cannot abduct the eye. Which nerve?", "Anatomy"),
        ("Which nerve supplies the deltoid muscle?", "Anatomy"),
        ("Which muscle is supplied by the trochlear nerve?", "Anatomy"),
        ("Write to ravi.m@example.org: which drug reverses heparin?", "Pharmacology"),
        ("UHID 2023/45678, BP 120/80 mmHg, on 5 mg amlodipine. Its class?", "Pharmacology"),
        ("Phone 98765 43210 says the child ate iron tablets. Antidote?", "Pharmacology"),
        ("Which drug did Dr. prescribe for absence seizures in a 6-year-old?", "Pharmacology"),
        ("What is the antidote of paracetamol poisoning?", "Pharmacology"),
    ]
    rows = []
    for i, (question, subject) in enumerate(questions, start=1):
        rows.append({"id": f"deid-{i:02d}", "question": question, "opa": f"Option one {i}", "opb": f"Option two {i}",
                     "opc": f"Option three {i}", "opd": f"Option four {i}", "cop": 1 + i % 4,
                     "subject_name": subject, "exp": None, "topic_name": None, "choice_type": "single"})
    rows[3]["exp"] = "Seen at 22 Linking Road by Dr. Meera Iyer; call 555-123-4567."
    # row 2 again for another patient (same MRN): a duplicate once both are scrubbed
    rows.append(dict(rows[1], id="deid-11", question=rows[1]["question"].replace("Sunita Devi", "Kamla Bai")))
    # invalid (cop 9), with an identifier in a field medlora does not know: skipped.jsonl must not hold it
    rows.append(dict(rows[0], id="deid-12", cop=9, contact="Patient ID A-99812"))
    return rows


def test_prepare_deidentify_writes_no_identifier_and_reports_counts(tmp_path, tiny_dir, capsys):
    from datasets import load_from_disk

    from medlora.cli import main

    data = tmp_path / "notes.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in medmcqa_rows()), encoding="utf-8")
    out = tmp_path / "prepared"
    main(["prepare", "--data_path", str(data), "--output_dir", str(out), "--model_name_or_path", str(tiny_dir),
          "--skip_invalid", "true", "--eval_fraction", "0.25", "--deidentify", "true"])
    printed = capsys.readouterr().out

    summary = json.loads((out / "prepare_summary.json").read_text())
    expected = {"EMAIL": 1, "RECORD_ID": 4, "DOB": 1, "PHONE": 2, "ADDRESS": 1, "NAME": 5}
    assert summary["deidentified"] == expected
    assert summary["duplicates_removed"] == 1  # scrubbed before deduplication
    assert summary["invalid_skipped"] == 1
    cells = [[c.strip() for c in line.strip().strip("│").split("│")] for line in printed.splitlines()]
    table = {row[0]: row[1] for row in cells if len(row) == 2}  # the rich table: "│ [EMAIL]     │        1 │"
    assert table == {**{f"[{k}]": str(v) for k, v in expected.items()}, "total": "14"}

    prepared = load_from_disk(str(out))
    rows = [r for split in prepared.values() for r in split]
    assert len(rows) == 10
    text = json.dumps(rows, ensure_ascii=False)
    assert "Dr. [NAME] notes ptosis" in text and "MRN: [RECORD_ID]" in text and "[ADDRESS] by Dr. [NAME]" in text
    assert "BP 120/80 mmHg, on 5 mg" in text and "Which drug did Dr. prescribe" in text
    skipped = (out / "skipped.jsonl").read_text(encoding="utf-8")
    assert "Patient ID [RECORD_ID]" in skipped
    for path in out.rglob("*"):  # Arrow, JSON, skipped rows: no identifier anywhere on disk
        if path.is_file():
            content = path.read_bytes()
            for secret in [*SECRETS, "Kamla Bai"]:
                assert secret.encode() not in content, (secret, path.name)
