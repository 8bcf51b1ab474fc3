"""`medlora bench-loss`: the LM head + cross-entropy alone, per implementation; JSON + Markdown.

    uv run medlora bench-loss --positions 800 6500 --step_tokens 6500

One training step of Nemotron-3-Nano ends in a [tokens, 2688] x [2688, 131,072] projection and a
cross-entropy. This times that piece alone (forward + backward to the hidden states; the frozen
head gets no gradient, as under LoRA) for each way of computing it:

* `full_logits` — transformers' own loss: logits for every position of the step, upcast to fp32,
  `cross_entropy(ignore_index=-100)`. What a model's forward does without TRL's fused head.
* `trl_chunked` — TRL 1.15's fused LM head (what every medlora backend trains with): only the
  positions with a label are projected, in tiles, with per-token entropy and top-1 for the metrics.
* `cce` — cut-cross-entropy's `linear_cross_entropy` on the labelled positions (Triton, CUDA only).
* `liger` — liger-kernel's `LigerFusedLinearCrossEntropyLoss` on the labelled positions (CUDA only).

Every implementation's loss and hidden-state gradient is compared with `full_logits` (fp32 maths
on the same inputs), so a fast but wrong kernel shows up in the same table.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Callable

from medlora.errors import MedloraError, shown

IMPLS = ("full_logits", "trl_chunked", "cce", "liger")


@dataclass
class LossBenchArguments:
    positions: list[int] = field(default_factory=lambda: [800, 6500], metadata={
        "help": "labelled (trained) positions per step; one measurement per value"})
    step_tokens: int = field(default=6500, metadata={"help": "tokens per step (full_logits projects all of them)"})
    hidden_size: int = field(default=2688, metadata={"help": "Nemotron-3-Nano: 2688"})
    vocab_size: int = field(default=131072, metadata={"help": "Nemotron-3-Nano: 131,072"})
    impls: list[str] = field(default_factory=lambda: list(IMPLS), metadata={"help": ", ".join(IMPLS)})
    iters: int = field(default=20, metadata={"help": "timed forward+backward calls per measurement"})
    warmup: int = field(default=3, metadata={"help": "untimed calls first (Triton compilation)"})
    dtype: str = field(default="bfloat16", metadata={"help": "bfloat16 on a GPU; CPU runs float32"})
    seed: int = field(default=0, metadata={"help": "seed"})
    results_dir: str = field(default="benchmarks/results/loss", metadata={
        "help": "where JSON/MD go (apart from `medlora bench` files, which have another schema)"})
    tag: str = field(default="loss", metadata={"help": "suffix for the result file name"})

    def validate(self) -> None:
        from medlora.config import need, need_count, need_file_tag, need_text

        need_file_tag(self.tag)

        unknown = set(self.impls) - set(IMPLS)
        need(not unknown and bool(self.impls), f"--impls: unknown {sorted(unknown)}; choose from {IMPLS}")
        for name, high in (("step_tokens", 10**7), ("hidden_size", 65536), ("vocab_size", 10**7), ("iters", 10**5)):
            need(getattr(self, name) >= 1, f"--{name} must be positive, got {getattr(self, name)}")
            need_count(getattr(self, name), f"--{name}", 1, high)
        need_count(self.warmup, "--warmup", 0, 10**4)
        need_count(self.seed, "--seed", 0, 2**32 - 1)
        need(bool(self.positions) and all(isinstance(p, int) and 1 <= p <= self.step_tokens for p in self.positions),
             f"--positions: each must be in 1..--step_tokens ({self.step_tokens}), got {self.positions}")
        need(self.dtype in ("bfloat16", "float16", "float32"),
             f"--dtype must be bfloat16, float16 or float32, got {shown(self.dtype)}")
        need_text(self.results_dir, "--results_dir")


def _impl(name: str, device) -> Callable:
    """loss(hidden [T, H], weight [V, H], labels [T] with -100) for one implementation."""
    import torch
    import torch.nn.functional as F

    if name == "full_logits":
        return lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y, ignore_index=-100)
    if name == "trl_chunked":
        from trl.trainer import utils as trl_utils

        from medlora.compat import _CpuOrTritonLogProb

        fn = _CpuOrTritonLogProb(trl_utils._ChunkedLogProbFunction)  # TRL's Triton kernel; plain maths on CPU

        def trl_loss(h, w, y):
            mask = y != -100
            log_probs = fn.apply(h[mask], w, None, y[mask], 1.0, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                 ("log_probs", "entropy", "is_top1"))[0]  # the outputs SFTTrainer asks for
            return -log_probs.sum() / mask.sum()
        return trl_loss
    if torch.device(device).type != "cuda":
        raise RuntimeError("needs CUDA (Triton kernel without a CPU path)")
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def cce_loss(h, w, y):
            mask = y != -100
            return linear_cross_entropy(h[mask], w, y[mask], reduction="mean")
        return cce_loss
    if name == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()

        def liger_loss(h, w, y):
            mask = y != -100
            return liger(w, h[mask], y[mask])
        return liger_loss
    raise MedloraError(f"--impls: unknown {shown(name)}; choose from {IMPLS}")


def measure(name: str, hidden, weight, labels, reference: tuple | None, iters: int, warmup: int) -> dict[str, Any]:
    import torch

    cuda = hidden.device.type == "cuda"
    try:
        fn = _impl(name, hidden.device)
    except (ImportError, RuntimeError) as err:
        return {"impl": name, "skipped": str(err).splitlines()[0]}
    h = hidden.detach().clone().requires_grad_(True)
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for i in range(warmup + iters):
        h.grad = None
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = fn(h, weight, labels)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    out = {"impl": name, "ms_median": round(1000 * times[len(times) // 2], 3), "ms_min": round(1000 * times[0], 3),
           "loss": float(loss)}
    if cuda:
        out["peak_extra_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
    if reference is not None:
        ref_loss, ref_grad = reference
        out["loss_abs_diff_vs_fp32"] = abs(float(loss) - ref_loss)
        out["grad_rel_diff_vs_fp32"] = float((h.grad.float() - ref_grad).norm() / ref_grad.norm().clamp_min(1e-30))
    return out


def run_loss_bench(args: LossBenchArguments) -> Path:
    import torch
    import torch.nn.functional as F

    from medlora import runinfo
    from medlora.runinfo import new_result_path

    args.validate()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    hidden = torch.randn(args.step_tokens, args.hidden_size, generator=gen).to(device, dtype)
    weight = (0.02 * torch.randn(args.vocab_size, args.hidden_size, generator=gen)).to(device, dtype)
    rows = []
    for positions in args.positions:
        labels = torch.full((args.step_tokens,), -100, dtype=torch.long)
        trained = torch.randperm(args.step_tokens, generator=gen)[:positions]
        labels[trained] = torch.randint(0, args.vocab_size, (positions,), generator=gen)
        labels = labels.to(device)
        h32 = hidden.detach().float().clone().requires_grad_(True)  # fp32 reference on the labelled positions (chunked for memory)
        mask = labels != -100
        ref = sum(F.cross_entropy(F.linear(h32[mask][i:i + 1024], weight.float()), labels[mask][i:i + 1024],
                                  reduction="sum") for i in range(0, positions, 1024)) / positions
        ref.backward()
        reference = (float(ref), h32.grad.detach())
        del h32, ref
        for name in args.impls:
            print(f"bench-loss: {name}, {positions} labelled of {args.step_tokens} positions", flush=True)
            try:
                row = measure(name, hidden, weight, labels, reference, args.iters, args.warmup)
            except torch.OutOfMemoryError as err:
                row = {"impl": name, "oom": True, "error": str(err).splitlines()[0]}
            rows.append({"positions": positions, **row})
    hw = runinfo.hardware()
    out = {"date": date.today().isoformat(), "gpu": hw.get("gpu"), "device": str(device), "dtype": str(dtype),
           "versions": runinfo.versions(), "hardware": hw, "config": asdict(args), "results": rows}
    path = new_result_path(args.results_dir, out["date"], hw.get("gpu"), args.tag)
    path.write_text(json.dumps(out, indent=2) + "\n")
    table = markdown_table(out)
    path.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {path} (+ .md)")
    return path


def markdown_table(out: dict[str, Any]) -> str:
    cfg = out["config"]
    lines = [f"{out['date']} · {out['gpu'] or 'CPU'} · {out['dtype']} · {cfg['step_tokens']} tokens/step · hidden "
             f"{cfg['hidden_size']} · vocab {cfg['vocab_size']:,} · torch {out['versions']['torch']} · trl "
             f"{out['versions']['trl']} · cut_cross_entropy {out['versions'].get('cut-cross-entropy')} · liger_kernel "
             f"{out['versions'].get('liger-kernel')}", "",
             "| labelled positions | implementation | fwd+bwd ms (median) | extra peak GiB | loss diff vs fp32 "
             "| grad rel. diff vs fp32 |", "|---|---|---|---|---|---|"]
    for r in out["results"]:
        if "skipped" in r or r.get("oom"):
            lines.append(f"| {r['positions']} | {r['impl']} | {'out of memory' if r.get('oom') else 'skipped: ' + r['skipped']} | | | |")
            continue
        lines.append(f"| {r['positions']} | {r['impl']} | {r['ms_median']:.2f} | {r.get('peak_extra_gib', '—')} | "
                     f"{r['loss_abs_diff_vs_fp32']:.2e} | {r['grad_rel_diff_vs_fp32']:.2e} |")
    return "\n".join(lines)
