"""`medlora eval` / `medlora ask`: load base (+ adapter), score, write predictions and summary."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from medlora import runinfo
from medlora.config import ConfigError, DataArguments, EvalArguments, MedloraError, ModelArguments, to_dict
from medlora.data import format_issues, load_medmcqa, write_skipped
from medlora.evaluate import score_rows, summarise, write_json, write_jsonl


def _model_identity(path: str) -> dict[str, Any] | None:
    """What identifies a local model dir: medlora's build stamp, else its config (names left out); None for hub ids."""
    local = Path(path).expanduser()
    if not local.is_dir():
        return None
    for name in ("medlora_model.json", "config.json"):
        try:
            data = json.loads((local / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if name == "config.json":
            data = {k: v for k, v in data.items() if k not in ("_name_or_path", "transformers_version", "dtype",
                                                                "torch_dtype", "use_cache")}
        return {name: data}
    return None


def check_adapter_base(adapter: str, adapter_config: dict[str, Any], model_path: str) -> None:
    """Refuse an adapter whose base_model_name_or_path names a different model than the one being loaded.

    Same string, or two local dirs holding the same model (medlora stamp / config): fine. Two different hub
    ids, or two local models that differ: refused. A hub id against a local dir cannot be compared offline:
    a warning, and the shapes are still checked when the adapter is loaded.
    """
    base = adapter_config.get("base_model_name_or_path")
    if not base or str(base).rstrip("/") == model_path.rstrip("/"):
        return
    ours, theirs = _model_identity(model_path), _model_identity(str(base))
    if ours is not None and theirs is not None:
        if Path(base).expanduser().resolve() == Path(model_path).expanduser().resolve() or ours == theirs:
            return
        (name, a), (other, b) = next(iter(ours.items())), next(iter(theirs.items()))
        keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        what = (f"a different model ({name} differs in {', '.join(keys[:8])})" if name == other
                else "a different model (only one of them is a medlora build)")
    elif ours is None and theirs is None:
        what = "a different hub model"
    else:
        print(f"medlora: warning: --adapter {adapter} was trained on {base!r}, you load {model_path!r}; "
              "they cannot be compared here (the adapter's shapes are still checked)", file=sys.stderr)
        return
    raise MedloraError(
        f"--adapter {adapter} was trained on {base!r}, but --model_name_or_path is {model_path!r}: {what}. "
        f"Pass --model_name_or_path {base}, or, if it is the same model under another name, set "
        f"base_model_name_or_path in {Path(adapter) / 'adapter_config.json'}"
    )


def load_for_eval(model_args: ModelArguments, adapter: str | None):
    """Base model, with the adapter applied when given; checks the adapter was made for this base."""
    import torch

    from medlora.model import load_model, resolve_model_path

    adapter_config: dict[str, Any] = {}
    if adapter is not None:  # checked before the (possibly 60 GB) base model is loaded
        config_path = Path(adapter) / "adapter_config.json"
        if not config_path.is_file():
            raise MedloraError(f"--adapter {adapter}: no adapter_config.json there (expected a PEFT adapter dir)")
        try:
            adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise MedloraError(f"{config_path}: not valid JSON ({err.msg}, line {err.lineno})") from None
        if not isinstance(adapter_config, dict):
            raise MedloraError(f"{config_path}: not a PEFT adapter config (a JSON object)")
        check_adapter_base(adapter, adapter_config, resolve_model_path(model_args))
    device = torch.device("cuda", 0) if torch.cuda.is_available() else None
    model, tokenizer = load_model(model_args, device=device)
    if adapter is None:
        return model, tokenizer
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        base = adapter_config.get("base_model_name_or_path")
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else type(err).__name__)
        raise MedloraError(
            f"--adapter {adapter} does not fit {resolve_model_path(model_args)!r} "
            f"(it was trained on {base!r}): {detail}"
        ) from None
    return model, tokenizer


def eval_format(data_args: DataArguments, adapter: str | None, tokenizer, model):
    """(FormatOptions, record): the adapter's recorded training format (adapter/medlora_format.json) when there is
    one, so prompts, BOS and the stop token are exactly those it was trained with; else from the flags."""
    from medlora.audit import zero_weight_rows
    from medlora.formatting import options_from_record
    from medlora.train import FORMAT_FILE, resolve_format

    record_path = Path(adapter) / FORMAT_FILE if adapter else None
    if record_path is not None and record_path.is_file():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            options = options_from_record(record)
        except (ValueError, KeyError, TypeError) as err:
            raise MedloraError(f"{record_path}: not a medlora format record ({type(err).__name__}: {err})") from None
        if data_args.style != options.style:
            print(f"medlora: note: {adapter} was trained with style {options.style!r}; scoring with its recorded "
                  f"format ({record_path.name}), not --style {data_args.style}", file=sys.stderr)
        return options, record
    return resolve_format(data_args, tokenizer, lambda ids: zero_weight_rows(model, ids))


def run_eval(model_args: ModelArguments, data_args: DataArguments, eval_args: EvalArguments) -> dict[str, Any]:
    for name, value, low in (("limit", eval_args.limit, 1), ("eval_batch_size", eval_args.eval_batch_size, 1),
                             ("bootstrap_samples", eval_args.bootstrap_samples, 0)):
        if value is not None and value < low:  # a negative --limit would silently drop rows from the end
            raise ConfigError(f"--{name} must be {'positive' if low else '>= 0'}, got {value}")
    if eval_args.compare_base and not eval_args.adapter:
        raise ConfigError("--compare_base compares the base model with an adapter: pass --adapter DIR too")
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
        "data": data_args.data_path, "adapter": eval_args.adapter, "style": options.style, "format": fmt,
        "model": model_args.model_name_or_path, "skipped_invalid": len(report.issues),
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
