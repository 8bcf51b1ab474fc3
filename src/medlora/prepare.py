"""`medlora prepare`: (optionally de-identify,) validate, clean, dedupe, split, format and save MedMCQA as Arrow."""

from __future__ import annotations

import json
import os
import tempfile
import shutil
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from medlora.config import DataArguments, ModelArguments, PrepareArguments
from medlora.errors import MedloraError  # noqa: F401
from medlora.outputs import write_atomic
from medlora.data import format_issues, letter_counts, load_medmcqa, split_rows, write_skipped
from medlora.deidentify import TYPES, deidentify_value
from medlora.formatting import build_prompt, encode_example


def dataset_statistics(splits: dict[str, list[dict[str, Any]]], tokenizer, options) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for name, rows in splits.items():
        lengths = [len(encode_example(tokenizer, r, options)["input_ids"]) for r in rows]
        stats[name] = {
            "rows": len(rows),
            "subjects": dict(Counter(r["subject_name"] for r in rows).most_common()),
            "answer_letters": letter_counts(rows),
            "tokens": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths),
                       "mean": round(statistics.fmean(lengths), 1)},
        }
    return stats


def deidentification_table(counts: Counter):
    from rich.table import Table
    from rich.text import Text

    table = Table(title="de-identified")
    table.add_column("placeholder")
    table.add_column("replaced", justify="right")
    for label in TYPES:
        table.add_row(Text(f"[{label}]"), str(counts[label]), end_section=label == TYPES[-1])  # Text: not markup
    table.add_row("total", str(sum(counts.values())))
    return table


def prepare(model_args: ModelArguments, data_args: DataArguments, prep: PrepareArguments) -> dict[str, Any]:
    from datasets import Dataset, DatasetDict
    from rich.console import Console
    from rich.table import Table

    from medlora.model import checkpoint_zero_rows, load_tokenizer, resolve_model_path
    from medlora.data import resolve_format

    from medlora.outputs import claim_output_dir

    out = Path(prep.output_dir)
    console = Console()
    deidentified: Counter = Counter()

    def scrub(raw_row: Any) -> Any:  # every string of every row read, before validation, cleaning and dedup
        scrubbed, found = deidentify_value(raw_row)
        deidentified.update(found)
        return scrubbed

    rows, report = load_medmcqa(data_args.data_path, data_args.train_split, data_args.cop_base,
                                data_args.skip_invalid, scrub=scrub if prep.deidentify else None)
    console.print(report.summary())
    if prep.deidentify:
        console.print(deidentification_table(deidentified))
    splits = split_rows(rows, data_args.eval_fraction, data_args.split_seed, prep.test_fraction)
    tokenizer = load_tokenizer(model_args)
    options, _ = resolve_format(data_args, tokenizer, checkpoint_zero_rows(resolve_model_path(model_args)))
    for part in splits.values():
        for row in part:
            letter = "ABCD"[row["cop"]]
            row["prompt"] = build_prompt(row, options, tokenizer)
            row["answer"] = letter
    stats = dataset_statistics(splits, tokenizer, options)
    # claimed only now that the data is known good, and written beside, then moved in: a run stopped half-way
    # (a full disk) leaves no dataset that `train --data` would take — prepare_summary.json, written last, is the
    # mark of a complete one
    claim_output_dir(out, "prepare", prep.overwrite, inputs=[data_args.data_path])
    staging = Path(tempfile.mkdtemp(prefix=".medlora-prepare-", dir=out))
    try:
        DatasetDict({name: Dataset.from_list(part) for name, part in splits.items()}).save_to_disk(str(staging))
        for entry in staging.iterdir():
            os.replace(entry, out / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    skipped = write_skipped(report, out)
    summary = {"source": data_args.data_path, "cop_numbering": report.cop_numbering, "rows_read": report.rows_read,
               "invalid_skipped": len(report.issues), "duplicates_removed": report.duplicates_removed,
               "cleaned_rows": report.cleaned_rows, "style": options.style, "splits": stats,
               "deidentified": {label: deidentified[label] for label in TYPES} if prep.deidentify else None}
    write_atomic(out / "prepare_summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")

    table = Table(title=f"prepared {data_args.data_path} -> {out}")
    for col in ("split", "rows", "subjects", "A/B/C/D", "tokens min/median/max"):
        table.add_column(col)
    for name, s in stats.items():
        t = s["tokens"]
        table.add_row(name, str(s["rows"]), str(len(s["subjects"])), "/".join(map(str, s["answer_letters"].values())),
                      f"{t['min']}/{t['median']}/{t['max']}")
    console.print(table)
    if skipped:
        console.print(format_issues(report.issues, f"invalid rows skipped (listed in {skipped})"))
    return summary
