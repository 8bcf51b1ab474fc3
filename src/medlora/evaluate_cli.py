"""`medlora eval` / `medlora ask`: load base (+ adapter), score, write predictions and summary."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from medlora import runinfo
from medlora.config import DataArguments, EvalArguments, ModelArguments, to_dict
from medlora.errors import ConfigError, MedloraError
from medlora.data import format_issues, load_medmcqa, write_skipped
from medlora.evaluate import eval_format, load_for_eval, score_rows, summarise
from medlora.runinfo import write_json, write_jsonl


def run_eval(model_args: ModelArguments, data_args: DataArguments, eval_args: EvalArguments,
             rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Score `data_args.data_path` (or `rows` already in memory, e.g. a training run's held-out split) with the
    base model or an adapter; write predictions.jsonl and summary.json into `eval_args.output_dir`."""
    from medlora.outputs import claim_output_dir

    eval_args.validate()
    out = Path(eval_args.output_dir)
    targets = [out / "predictions.jsonl", out / "summary.json"]
    # before any scoring: a directory that is not medlora's, or cannot be written, is refused now, not after
    claim_output_dir(out, "eval", eval_args.overwrite,
                     inputs=[i for i in (data_args.data_path, eval_args.adapter, model_args.model_name_or_path) if i])
    report = None
    if rows is None:  # evaluation keeps rows whose correct option text repeats (lm-eval scores them too; flagged)
        rows, report = load_medmcqa(data_args.data_path, data_args.eval_split, data_args.cop_base,
                                    data_args.skip_invalid, evaluation=True)
        print(report.summary())
        if report.issues:
            print(format_issues(report.issues, "rows skipped (see skipped.jsonl)"))
            write_skipped(report, out)
    if eval_args.limit:
        rows = rows[: eval_args.limit]
    model, tokenizer = load_for_eval(model_args, eval_args.adapter)
    options, fmt = eval_format(data_args, eval_args.adapter, tokenizer, model)
    started = time.time()
    preds = score_rows(model, tokenizer, rows, options, eval_args.eval_batch_size)
    summary = summarise(preds, eval_args.bootstrap_samples)
    summary["seconds"] = round(time.time() - started, 2)
    if eval_args.adapter and eval_args.compare_base:
        with model.disable_adapter():
            base_preds = score_rows(model, tokenizer, rows, options, eval_args.eval_batch_size)
        base = summarise(base_preds, eval_args.bootstrap_samples)
        summary["base"] = {k: base[k] for k in ("accuracy", "ci95", "per_subject", "pred_letters")}
        summary["delta_accuracy"] = summary["accuracy"] - base["accuracy"]
        for pred, base_pred in zip(preds, base_preds):
            pred["base_pred"] = base_pred["pred"]
    summary.update({
        "data": data_args.data_path if report else "rows given in memory", "adapter": eval_args.adapter, "style": options.style, "format": fmt,
        "model": model_args.model_name_or_path, "skipped_invalid": len(report.issues) if report else 0,
        "config": to_dict(model_args, data_args, eval_args), "versions": runinfo.versions(),
        "hardware": runinfo.hardware(),
    })
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "predictions.jsonl", preds)
    write_json(out / "summary.json", summary)
    low, high = summary["ci95"]
    interval = f"95% CI {low:.3f}-{high:.3f}, " if low is not None else ""  # none with --bootstrap_samples 0
    print(f"accuracy {summary['accuracy']:.4f} ({interval}n={summary['n']}; "
          f"majority-letter baseline {summary['majority_baseline']:.3f})"
          + (f"; base {summary['base']['accuracy']:.4f}" if "base" in summary else ""))
    print(f"wrote {targets[0]} and {targets[1]}")
    return summary
