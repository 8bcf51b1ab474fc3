"""`medlora eval` / `medlora ask`: load base (+ adapter), score, write predictions and summary."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from medlora import runinfo
from medlora.config import DataArguments, EvalArguments, MedloraError, ModelArguments, to_dict
from medlora.data import format_issues, load_medmcqa, write_skipped
from medlora.evaluate import score_rows, summarise, write_json, write_jsonl


def load_for_eval(model_args: ModelArguments, adapter: str | None):
    """Base model, with the adapter applied when given; checks the adapter was made for this base."""
    import torch

    from medlora.model import load_model, resolve_model_path

    device = torch.device("cuda", 0) if torch.cuda.is_available() else None
    model, tokenizer = load_model(model_args, device=device)
    if adapter is None:
        return model, tokenizer
    config_path = Path(adapter) / "adapter_config.json"
    if not config_path.is_file():
        raise MedloraError(f"--adapter {adapter}: no adapter_config.json there (expected a PEFT adapter dir)")
    try:
        adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MedloraError(f"{config_path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        base = adapter_config.get("base_model_name_or_path")
        raise MedloraError(
            f"--adapter {adapter} does not fit {resolve_model_path(model_args)!r} "
            f"(it was trained on {base!r}): {str(err).splitlines()[0]}"
        ) from None
    return model, tokenizer


def run_eval(model_args: ModelArguments, data_args: DataArguments, eval_args: EvalArguments) -> dict[str, Any]:
    from medlora.train import format_options

    out = Path(eval_args.output_dir)
    targets = [out / "predictions.jsonl", out / "summary.json"]
    if any(t.exists() for t in targets) and not eval_args.overwrite:
        raise MedloraError(f"{out} already holds predictions/summary; pass --overwrite or another --output_dir")
    # Evaluation keeps rows whose correct option text repeats (lm-eval scores them too); they are flagged.
    rows, report = load_medmcqa(data_args.data_path, data_args.eval_split, data_args.cop_base,
                                data_args.skip_invalid, evaluation=True)
    print(report.summary())
    if report.issues:
        print(format_issues(report.issues, "rows skipped (see skipped.jsonl)"))
        write_skipped(report, out)
    if eval_args.limit:
        rows = rows[: eval_args.limit]
    options = format_options(data_args)
    model, tokenizer = load_for_eval(model_args, eval_args.adapter)
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
        "data": data_args.data_path, "adapter": eval_args.adapter, "style": options.style,
        "model": model_args.model_name_or_path, "skipped_invalid": len(report.issues),
        "config": to_dict(model_args, data_args, eval_args), "versions": runinfo.versions(),
        "hardware": runinfo.hardware(),
    })
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "predictions.jsonl", preds)
    write_json(out / "summary.json", summary)
    low, high = summary["ci95"]
    print(f"accuracy {summary['accuracy']:.4f} (95% CI {low:.3f}-{high:.3f}, n={summary['n']}; "
          f"majority-letter baseline {summary['majority_baseline']:.3f})"
          + (f"; base {summary['base']['accuracy']:.4f}" if "base" in summary else ""))
    print(f"wrote {targets[0]} and {targets[1]}")
    return summary
