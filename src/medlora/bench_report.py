"""Reporting of `medlora bench` results: the Markdown table and chart of one run, and the reading of every
committed result (`load_results`) that notebook 04 and the README's numbers use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def markdown_table(out: dict[str, Any]) -> str:
    v = out["versions"]
    cfg = out["config"]["bench"]
    lines = [
        f"{out['date']} · {out['gpu'] or 'CPU'} · world size {out['world_size']} · model {cfg['model_spec']} · "
        f"batch {cfg['per_device_train_batch_size']} · max_length {cfg['max_length']} · "
        f"experts {cfg['experts_implementation']} · torch {v['torch']} · transformers {v['transformers']} · "
        f"trl {v['trl']} · peft {v['peft']} · unsloth {v['unsloth']}",
        "",
        "| backend | batch | checkpointing | tokens/s | per GPU | vs hf | vs unsloth | trained tok/s | samples/s "
        "| step s (median / mean / max) | peak GiB | MFU (6N / LoRA) | trainable | epoch h (182,822 q) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["results"]:
        if r.get("oom") or r.get("failed"):
            what = "out of memory" if r.get("oom") else "failed"
            lines.append(f"| {r['backend']} | {r['batch_size']} | | {what} | | | | | | | | | | |")
            continue
        mfu = " / ".join(f"{100 * r[k]:.2f} %" if r.get(k) is not None else "—" for k in ("mfu", "mfu_lora"))
        step = r["step_s"]
        steps = " / ".join(f"{step[k]:.3f}" if k in step else "—" for k in ("median", "mean", "max"))
        ratios = " | ".join(f"{r[k]:.2f}x" if k in r else "—" for k in ("speedup_vs_hf", "speedup_vs_unsloth"))
        lines.append(f"| {r['backend']} | {r['batch_size']} | {r['gradient_checkpointing']} | "
                     f"{r['tokens_per_s']:,.0f} | {r.get('tokens_per_s_per_gpu', r['tokens_per_s']):,.0f} | {ratios} | {r['trained_tokens_per_s']:,.0f} | "
                     f"{r['samples_per_s']:.2f} | {steps} | {r['peak_mem_gib']} | {mfu} | "
                     f"{r['trainable_params']:,} | {r['epoch_hours_medmcqa_train']} |")
    return "\n".join(lines)


def plot(out: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend and open figures stay as they are

    names = [r["backend"] + (" (OOM)" if r.get("oom") else " (failed)" if r.get("failed") else "")
             for r in out["results"]]
    values = [r["tokens_per_s"] or 0 for r in out["results"]]
    fig = Figure(figsize=(max(5, 1.3 * len(names)), 3))
    ax = fig.subplots()
    bars = ax.bar(names, values, color=(["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"] * 3)[: len(names)])
    ax.tick_params(axis="x", labelsize=7, rotation=20)
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values])
    ax.set_ylabel("tokens/s (non-padding)")
    ax.set_title(f"{out['config']['bench']['model_spec']} on {out['gpu'] or 'CPU'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)




# ---------------------------------------------------------------- every committed result (notebook 04, README)


FAMILY_COLOURS = {"hf": "#4C72B0", "hf+triton": "#8172B3", "unsloth": "#DD8452", "fast": "#55A868"}


def load_results(results_dir: str | Path = "benchmarks/results") -> dict[str, dict[str, Any]]:
    """{file name: result} for every `medlora bench` JSON in `results_dir`, oldest first (names start with the
    date). Other JSON kinds beside them (rehearsals, bench-loss: in their own folders) are not bench results."""
    results = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "results" in data and "bench" in data.get("config", {}):
            results[path.name] = data
    return results


def family(spec: str) -> str:
    """hf, hf+triton, unsloth or fast: what a chart compares (fast's lever variants are one family)."""
    from medlora.backend import Backend

    backend = Backend.parse(spec)
    return "hf+triton" if backend.triton_mamba_ops else backend.name


def _levers(result: dict[str, Any]) -> str | None:
    from medlora.fast import LEVERS

    on = set((result.get("backend_report") or {}).get("levers") or [])
    return "+".join(lever for lever in LEVERS if lever in on) or None  # one spelling per set


def results_table(results: dict[str, dict[str, Any]]):
    """One row per (file, backend): setting, throughput, memory, MFU, epoch time, out of memory / failed."""
    import pandas as pd

    rows = []
    for name, out in results.items():
        cfg = out["config"]["bench"]
        for r in out["results"]:
            rows.append({
                "file": name, "date": out["date"], "gpu": (out["gpu"] or "CPU").replace("NVIDIA ", ""),
                "model": cfg["model_spec"], "backend": r["backend"], "family": family(r["backend"]),
                "levers": _levers(r),
                "batch_size": r.get("batch_size", cfg["per_device_train_batch_size"]),
                "gradient_checkpointing": str(r.get("gradient_checkpointing", cfg["gradient_checkpointing"])),
                "experts": cfg["experts_implementation"],
                **{key: r.get(key) for key in ("tokens_per_s", "samples_per_s", "peak_mem_gib", "mfu",
                                                "epoch_hours_medmcqa_train")},
                "oom": bool(r.get("oom")), "failed": bool(r.get("failed")),
            })
    return pd.DataFrame(rows)


def best_settings(table):
    """Per (model, GPU, family) the row with the most tokens/s that fitted in memory, with its speed-ups over
    the best hf and the best unsloth of the same model and GPU."""
    fits = table[~table["oom"] & ~table["failed"]].dropna(subset=["tokens_per_s"])
    best = fits.loc[fits.groupby(["model", "gpu", "family"])["tokens_per_s"].idxmax()].copy()
    for base in ("hf", "unsloth"):
        reference = best[best["family"] == base].set_index(["model", "gpu"])["tokens_per_s"]
        best[f"vs_{base}"] = [row.tokens_per_s / reference[(row.model, row.gpu)]
                              if (row.model, row.gpu) in reference.index else None for row in best.itertuples()]
    order = {"hf": 0, "hf+triton": 1, "unsloth": 2, "fast": 3}
    return best.sort_values(["model", "gpu", "family"], key=lambda c: c.map(order) if c.name == "family" else c)


def plot_best(best, path: Path | None = None):
    """One bar chart per (model, GPU): each backend family at its best setting, its speed-up over hf labelled."""
    import matplotlib.pyplot as plt

    groups = list(best.groupby(["model", "gpu"], sort=True))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 4.2), squeeze=False)
    for ax, ((model, gpu), part) in zip(axes[0], groups):
        bars = ax.bar(part["family"], part["tokens_per_s"], color=[FAMILY_COLOURS[f] for f in part["family"]])
        labels = [f"{t:,.0f}" + (f"\n{v:.1f}x hf" if v == v and v is not None else "")
                  for t, v in zip(part["tokens_per_s"], part["vs_hf"])]
        ax.bar_label(bars, labels=labels, fontsize=8)
        ax.set_title(f"{model} on {gpu}", fontsize=10)
        ax.set_ylabel("tokens/s (non-padding)")
        ax.margins(y=0.25)
    fig.suptitle("medlora bench: each backend at its best measured setting", fontsize=11)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def lever_table(table):
    """fast's lever variants (levers on, checkpointing, batch) per model and GPU, from the files that name them."""
    fast = table[(table["family"] == "fast") & ~table["oom"] & ~table["failed"]].dropna(subset=["tokens_per_s"])
    columns = ["model", "gpu", "file", "backend", "levers", "gradient_checkpointing", "batch_size", "tokens_per_s",
               "peak_mem_gib"]
    return fast[columns].sort_values(["model", "gpu", "file", "tokens_per_s"], ascending=[True, True, True, False])


def plot_levers(levers, path: Path | None = None):
    """Horizontal bars of every fast variant, one panel per (model, GPU): levers and checkpointing in the label."""
    import matplotlib.pyplot as plt

    groups = list(levers.groupby(["model", "gpu"], sort=True))
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 0.45 * len(levers) + 1.4 * len(groups)), squeeze=False)
    for ax, ((model, gpu), part) in zip(axes[:, 0], groups):
        labels = [f"{lv or 'no levers'} | checkpointing {c} | batch {b} | {Path(f).stem}" for lv, c, b, f in
                  zip(part["levers"], part["gradient_checkpointing"], part["batch_size"], part["file"])]
        bars = ax.barh(labels, part["tokens_per_s"], color="#55A868")
        ax.bar_label(bars, labels=[f"{t:,.0f}" for t in part["tokens_per_s"]], fontsize=7, padding=2)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(f"fast variants: {model} on {gpu}", fontsize=9)
        ax.margins(x=0.15)
    axes[-1, 0].set_xlabel("tokens/s (non-padding)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def summary_lines(best) -> list[str]:
    """One sentence per (model, GPU): the best of each family, and fast against hf and Unsloth."""
    lines = []
    for (model, gpu), part in best.groupby(["model", "gpu"], sort=True):
        by = part.set_index("family")
        text = ", ".join(f"{f} {by.loc[f, 'tokens_per_s']:,.0f}" for f in by.index)
        if "fast" in by.index:
            ratios = [f"{by.loc['fast', f'vs_{b}']:.1f}x {b}" for b in ("hf", "unsloth")
                      if by.loc["fast", f"vs_{b}"] == by.loc["fast", f"vs_{b}"] and by.loc["fast", f"vs_{b}"]]
            text += f" tokens/s; fast = {', '.join(ratios)}" if ratios else " tokens/s"
        else:
            text += " tokens/s"
        lines.append(f"{model} on {gpu}: {text}")
    return lines
