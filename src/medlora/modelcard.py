"""`medlora report`: a model card (MODEL_CARD.md) for a finished run, written from its metrics.json.

`train` writes it at the end of every run; `medlora report --run_dir DIR` rewrites it (e.g. after
editing the data licence line). Everything in it comes from metrics.json, so it never shows a number
the run did not produce. Secrets cannot reach it: metrics.json's config is TrainingArguments.to_dict
(tokens masked) and `train` refuses --hub_token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medlora.errors import MedloraError

CARD_MARKER = "<!-- model card written by medlora from metrics.json (`medlora report` rewrites it) -->"
NOT_ADVICE = ("**Not medical advice.** This adapter answers multiple-choice exam questions. Its outputs are not "
              "medical advice, diagnosis or treatment, must not be used for patient care, and can be confidently "
              "wrong.")


@dataclass
class ReportArguments:
    run_dir: str = field(default="outputs/tiny-run", metadata={"help": "a finished `medlora train` output dir"})
    output: str | None = field(default=None, metadata={"help": "where to write (default RUN_DIR/MODEL_CARD.md)"})

    def validate(self) -> None:
        from medlora.config import need_text

        need_text(self.run_dir, "--run_dir")
        need_text(self.output, "--output", optional=True)


def data_licence(path: str) -> str:
    lowered = path.lower()
    if "data/sample" in lowered:
        return "medlora's sample questions (CC0 1.0, written for this repository; see data/sample/README.md)"
    if "medmcqa" in lowered:
        return ("MedMCQA (Pal et al., CHIL 2022), MIT License, (c) 2022 MedMCQA — "
                "https://github.com/medmcqa/medmcqa")
    return "user-supplied data: licence not recorded — state it here before sharing this adapter"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def format_lines(fmt: dict[str, Any] | None) -> list[str]:
    """How answers end and prompts begin (metrics.json `format`; runs before medlora 0.1 have none)."""
    if not fmt:
        return []
    stop = fmt.get("stop", {})
    lines = [f"- Stop token (ends every trained answer): `{stop.get('token')}`"
             + (f" (id {stop['id']})" if "id" in stop else "") + f" — {stop.get('reason')}",
             f"- BOS before each prompt: {'yes' if fmt.get('add_bos_token') else 'no'} ({fmt.get('bos_source')})"]
    chat = fmt.get("chat_template")
    if chat:
        lines.append(f"- Chat template: enable_thinking {chat['enable_thinking']}; think tags in the (masked) prompt: "
                     f"{chat['think_tags_in_prompt']}; injected before the answer and not trained: "
                     f"`{chat['injected_before_content_not_trained'] or 'nothing'}`")
    return lines


def recipe_lines(metrics: dict[str, Any]) -> list[str]:
    """The careful-recipe facts: which checkpoint the adapter is, early stopping, forgetting, replay."""
    lines: list[str] = []
    best, last, early = metrics.get("best_checkpoint"), metrics.get("last_eval"), metrics.get("early_stopping")
    forgetting, mix = metrics.get("forgetting"), metrics.get("data_mix")
    if best:
        what = (f"the best checkpoint, step {best['step']} ({best['metric']} {best['value']:.4f})"
                if best.get("adapter_is_best") else f"the last step (best was step {best['step']}, "
                f"{best['metric']} {best['value'] if best['value'] is None else round(best['value'], 4)})")
        lines.append(f"- The adapter is {what}" + (
            f"; at the last evaluation (step {last['step']}) eval accuracy was {_pct(last.get('eval_accuracy'))}"
            if last else ""))
    if early:
        lines.append(f"- Early stopping (patience {early['patience']}): " + (
            f"stopped at step {early['at_step']}" + (f" of {early['planned_steps']}" if early.get("planned_steps")
                                                     else "") if early["stopped_early"] else "did not trigger"))
    if forgetting:
        lines.append(f"- Forgetting guard on {forgetting['n']} general-knowledge questions: base "
                     f"{_pct(forgetting['base_general_accuracy'])}, adapter {_pct(forgetting['general_accuracy'])} "
                     f"(drop {forgetting['drop'] * 100:+.1f} points; limit "
                     f"{forgetting['max_forgetting'] if forgetting['max_forgetting'] is not None else 'none'})"
                     + (f"; **the run was stopped at step {forgetting['stopped']['step']}** (drop "
                        f"{forgetting['stopped']['drop'] * 100:.1f} points)" if forgetting.get("stopped") else ""))
    if mix:
        lines.append(f"- Replay: {mix['replay']} general rows mixed into {mix['medical']} medical ones "
                     f"({mix['ratio'] * 100:.1f} % of training)")
    return ["", "### Checkpoint selection and forgetting", "", *lines] if lines else []


def render_model_card(metrics: dict[str, Any]) -> str:
    cfg = metrics["config"]
    model, lora, data = cfg["ModelArguments"], cfg["LoraArguments"], cfg["DataArguments"]
    run, sft = cfg["RunArguments"], cfg["SFTConfig"]
    versions = metrics.get("versions", {})
    ci = metrics.get("eval_accuracy_ci95") or [None, None]
    lines = [
        CARD_MARKER,
        f"# LoRA adapter for {model['model_name_or_path']} on MedMCQA-style questions",
        "",
        f"> {NOT_ADVICE}",
        "",
        "## Model",
        "",
        f"- Base model: `{model['model_name_or_path']}` (revision {model.get('revision') or 'default'}, "
        f"dtype {model.get('torch_dtype')})",
        f"- Adapter: LoRA r={lora['lora_r']}, alpha={lora['lora_alpha']}, dropout={lora['lora_dropout']}; "
        f"modules {', '.join(lora['lora_target_modules'])}; parameters "
        f"{', '.join(lora['lora_target_parameters']) or 'none'}",
        f"- Trainable parameters: {metrics['lora']['trainable_params']:,} of {metrics['lora']['total_params']:,}",
        f"- Training backend: {metrics.get('backend', run.get('backend'))}; world size {metrics.get('world_size')}",
        *quantization_lines((metrics.get("backend_report") or {}).get("quantization")),
        "",
        "## Data",
        "",
        f"- Source: `{data['data_path']}`" + (f", eval `{data['eval_data_path']}`" if data.get("eval_data_path") else
                                              f", eval = {data['eval_fraction']:.0%} held out (seed {data['split_seed']})"),
        f"- Licence: {data_licence(str(data['data_path']))}",
        f"- Examples: {metrics['train_examples']} train, {metrics['eval_examples']} eval; left out as longer than "
        f"max_length: {', '.join(f'{k} {v}' for k, v in metrics['skipped_too_long'].items())}; invalid rows "
        f"skipped: {metrics['skipped_invalid']}",
        f"- Prompt style: `{data['style']}` (include option text: {data['include_option_text']}, explanation: "
        f"{data['include_explanation']})",
        *format_lines(metrics.get("format")),
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    for key in ("learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size",
                "gradient_accumulation_steps", "max_length", "optim", "lr_scheduler_type", "warmup_steps", "seed",
                "bf16", "packing"):
        if key in sft:
            lines.append(f"| {key} | {sft[key]} |")
    lines += [
        f"| steps run | {metrics['global_steps']} |",
        f"| train loss | {metrics['train_loss']:.4f} |",
        f"| eval loss | {metrics['eval_loss']:.4f} |" if metrics.get("eval_loss") is not None else "| eval loss | — |",
        "",
        "## Results (MedMCQA log-likelihood scoring of A–D, as lm-evaluation-harness `medmcqa`)",
        "",
        f"- Accuracy: **{_pct(metrics['eval_accuracy'])}** on {metrics['eval_n']} held-out questions "
        f"(95 % bootstrap CI {_pct(ci[0])} – {_pct(ci[1])})",
        f"- Base model, same questions: {_pct(metrics['base_eval_accuracy'])}; majority-letter baseline "
        f"{_pct(metrics.get('majority_baseline'))}",
        "",
        "| subject | n | base | adapter |",
        "|---|---|---|---|",
    ]
    base = metrics.get("base_per_subject") or {}
    for subject, row in sorted((metrics.get("per_subject") or {}).items()):
        lines.append(f"| {subject} | {row['n']} | {_pct(base.get(subject, {}).get('accuracy'))} | "
                     f"{_pct(row['accuracy'])} |")
    lines += recipe_lines(metrics)
    lines += [
        "",
        "## Intended use",
        "",
        "Research and education: studying how fine-tuning changes a model's answers to medical entrance-exam "
        "questions, and as a starting point for further evaluation. Out of scope: any clinical, diagnostic, "
        "triage or treatment use; answering questions of real patients; use without a human expert checking "
        "every output.",
        "",
        "## Limitations",
        "",
        "- Exam questions are not clinical practice; accuracy here says little about safety at the bedside.",
        "- The model can state wrong answers fluently; it has no notion of uncertainty it can report reliably.",
        "- MedMCQA comes from Indian medical entrance exams (AIIMS / NEET PG); coverage of other curricula, "
        "languages and populations is unknown.",
        "",
        "## Reproduce",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items() if v and k != 'git_commit')}; "
        f"commit {versions.get('git_commit')}. Hardware: {metrics.get('hardware', {}).get('gpu') or 'CPU'}. "
        "Full configuration: `metrics.json` (`config`).",
        "",
    ]
    return "\n".join(lines)


def quantization_lines(quantization: dict | None) -> list[str]:
    """What a --load_in_4bit run trained on: parameters by storage dtype (the adapter itself is for the bf16 base)."""
    if not quantization:
        return []
    counts = ", ".join(f"{k} {v:,}" for k, v in quantization["parameters_by_dtype"].items())
    linear = (f" and {quantization['nf4_linear_layers']} nn.Linear layers ({quantization['nf4_linear_gib']} GiB)"
              if quantization.get("nf4_linear_layers") else "")
    return [f"- Base weights during training (`--load_in_4bit`): routed experts of {quantization['nf4_expert_layers']} "
            f"MoE layers in NF4 ({quantization['nf4_gib']} GiB){linear}; parameters by dtype: {counts}. The adapter is "
            "an ordinary PEFT adapter for the bf16 base, trained against NF4-rounded weights"]


def write_model_card(run_dir: str | Path, output: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise MedloraError(f"{run_dir}: no metrics.json (is it a finished `medlora train` output dir?)")
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        text = render_model_card(metrics)
    except (ValueError, KeyError, TypeError) as err:
        raise MedloraError(f"{metrics_path}: not a medlora metrics file ({type(err).__name__}: {err})") from None
    from medlora.outputs import claim_output_file, write_atomic

    out = claim_output_file(Path(output) if output else run_dir / "MODEL_CARD.md", CARD_MARKER)  # never metrics.json
    write_atomic(out, text)
    return out


# ---------------------------------------------------------------- comparing runs (notebook 04)


def load_runs(run_dirs: dict[str, str | Path]) -> dict[str, dict[str, Any]]:
    """{label: metrics.json} for the run dirs that have one (a missing one is left out, and said)."""
    runs = {}
    for label, run_dir in run_dirs.items():
        path = Path(run_dir) / "metrics.json"
        if path.is_file():
            runs[label] = json.loads(path.read_text(encoding="utf-8"))
        else:
            print(f"{path} not found: {label} is left out of the comparison")
    return runs


def _setting(metrics: dict[str, Any]) -> tuple:
    cfg = metrics["config"]
    return (cfg["ModelArguments"]["model_name_or_path"], cfg["DataArguments"]["data_path"],
            cfg["SFTConfig"]["max_steps"], cfg["SFTConfig"]["seed"], metrics.get("hardware", {}).get("gpu"))


def compare_runs(runs: dict[str, dict[str, Any]]):
    """(table of each run's results and setting, figure: train loss curves + base/adapter accuracy). The runs
    compare only when model, data, steps, seed and GPU agree: the table says where they do not."""
    import matplotlib.pyplot as plt
    import pandas as pd

    keys = ("backend", "train_loss", "eval_loss", "eval_accuracy", "base_eval_accuracy", "eval_n", "global_steps",
            "train_runtime_s", "train_samples_per_second", "wall_time_s")
    table = pd.DataFrame({name: {**{k: m.get(k) for k in keys}, "model": _setting(m)[0], "data": _setting(m)[1],
                                 "seed": _setting(m)[3], "gpu": _setting(m)[4]} for name, m in runs.items()})
    if len({_setting(m) for m in runs.values()}) > 1:
        print("note: the runs differ in model, data, steps, seed or GPU (rows model/data/seed/gpu): compare with care")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 4.2))
    for (name, m), style in zip(runs.items(), ("o-", "s--", "^:", "d-.")):  # curves may coincide: other markers
        log = pd.DataFrame(m["log_history"]).dropna(subset=["loss"])
        ax_loss.plot(log["step"], log["loss"], style, label=name, fillstyle="none")
    ax_loss.set(xlabel="step", ylabel="train loss (trained tokens)", title="train loss")
    ax_loss.legend()
    names = list(runs)
    positions = range(len(names))
    ax_acc.bar([p - 0.2 for p in positions], [runs[n]["base_eval_accuracy"] for n in names], 0.4, label="base")
    ax_acc.bar([p + 0.2 for p in positions], [runs[n]["eval_accuracy"] for n in names], 0.4, label="adapter")
    ax_acc.set_xticks(list(positions), names)
    ax_acc.set(ylim=(0, 1), ylabel="accuracy", title="MedMCQA accuracy on the eval split")
    ax_acc.legend()
    fig.tight_layout()
    return table, fig
