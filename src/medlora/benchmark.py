"""`medlora bench`: time K steps of the real SFTTrainer loop per backend, write JSON + Markdown + PNG.

    uv run medlora bench --model_spec nano-quarter --backends hf unsloth --per_device_train_batch_size 8

Each (round, backend) runs in its own process — Unsloth patches transformers and TRL on import, so
an `hf` run must never share a process with it — and backends alternate round by round so they
share the machine's conditions. Every worker builds the same `SFTTrainer` configuration that
`medlora train` uses (same pre-tokenised MedMCQA examples, completion-only loss, optimizer, LoRA
targets) and times optimizer steps after a warm-up with CUDA synchronisation on both sides.

MFU = tokens/s x FLOPs/token / peak bf16 FLOP/s, reported two ways (FLOPS_FORMULAS, written into the JSON):
`mfu_lora` counts what a LoRA step computes (4 x N_active through the frozen weights, 6 x N_lora_active for the
adapters), `mfu` the full fine-tuning convention 6 x N_active of NVIDIA's and PaLM's tables; both add
12 x L_attn x d_attn x T for attention. N_active = parameters a token meets: all dense weights, the LM head and
top_k / n_experts of the routed experts (and of their LoRA factors); input embeddings excluded.
Peak: 989 TFLOP/s dense bf16 for H100/H200 SXM, 312 for A100.
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from medlora.config import LoraArguments
from medlora.model import NANO_CONFIG, NANO_PATTERN, SPECS, build_in_memory  # noqa: F401 - the bench's specs
from medlora.errors import ConfigError, MedloraError, shown

MEDMCQA_TRAIN_QUESTIONS = 182_822
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
@dataclass
class BenchArguments:
    model_spec: str = field(default="tiny", metadata={"help": "tiny, nano-quarter (13 of 52 layers), nano-full"})
    backends: list[str] = field(default_factory=lambda: ["hf"], metadata={
        "help": "hf, unsloth, fast (train's default levers), fast[lever+lever] (only those levers on), "
                "fast[-lever] (the defaults less that one), fast[+lever] (the defaults and that one), a suffix @sm80 "
                "(fast with the A100 kernels), +nf4 (fast with --load_in_4bit: routed experts and linear layers in "
                "NF4), hf+triton (hf with Triton Mamba ops)"})
    bench_steps: int = field(default=10, metadata={"help": "timed optimizer steps per round"})
    bench_warmup_steps: int = field(default=3, metadata={"help": "untimed steps first (compilation, caches)"})
    rounds: int = field(default=2, metadata={"help": "alternating rounds per backend"})
    nproc_per_node: int = field(default=1, metadata={
        "help": "GPUs (processes) per worker: >1 runs each worker under torchrun with DDP; tokens/s is counted "
                "over all ranks and also reported per GPU"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "questions per step"})
    max_length: int = field(default=1024, metadata={"help": "longer examples are left out (and counted)"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "activation checkpointing"})
    backend_batch_size: list[str] = field(default_factory=list, metadata={
        "help": "per-backend questions per step, e.g. hf=4 unsloth=16 fast=64 (each backend at its best)"})
    backend_gradient_checkpointing: list[str] = field(default_factory=list, metadata={
        "help": "per-backend activation checkpointing, e.g. hf=false fast=true; fast also takes block kinds "
                "(selective), e.g. fast=moe+mamba"})
    profile: bool = field(default=False, metadata={
        "help": "profile one timed step of each worker (torch.profiler, the last unless --profile_step): top GPU "
                "kernels, device-busy time and idle gaps in the JSON; that step is reported, not timed"})
    profile_step: int = field(default=0, metadata={
        "help": "with --profile: which timed step to profile, 1 = the first (to see inside an outlier step the "
                "JSON's steps[*] named); 0 = the last"})
    experts_implementation: str | None = field(default="grouped_mm", metadata={"help": "MoE experts kernel"})
    sdpa_cudnn: bool | None = field(default=None, metadata={
        "help": "SDPA's cuDNN backend in every worker (torch.backends.cuda.enable_cudnn_sdp): true / false for all; "
                "default as `train` runs it, off for hf and hf+triton, torch's default for the rest "
                "(medlora.backends.set_sdpa_cudnn); fast has no SDPA call"})
    data_path: str = field(default="../shared/data/medmcqa/dev.jsonl", metadata={"help": "MedMCQA-format file"})
    results_dir: str = field(default="benchmarks/results", metadata={"help": "where JSON/MD/PNG go"})
    model_cache_dir: str = field(default="outputs/bench-models", metadata={"help": "random-weight models saved here"})
    in_memory: bool = field(default=False, metadata={
        "help": "build the random model on the device in every worker (same seed, same weights) instead of saving "
                "it: nano-full's 63 GB do not fit the GPU machines' disk. hf, hf+triton and fast only"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    optim: str = field(default="adamw_bnb_8bit", metadata={"help": "optimizer, as in medlora train on a GPU"})
    seed: int = field(default=0, metadata={"help": "seed"})
    tag: str = field(default="", metadata={"help": "suffix for the result file name"})
    include_explanation: bool = field(default=False, metadata={
        "help": "train on the explanation too (MedMCQA's exp field: samples several times longer), as "
                "`train --include_explanation true` does"})

    def validate(self) -> None:
        """Everything checkable before a worker starts (each a ConfigError naming the option)."""
        import torch

        from medlora.backend import Backend
        from medlora.config import need, need_count, need_file_tag, need_number, need_text

        need(bool(self.backends), "--backends: name at least one backend")
        need_text(self.model_spec, "--model_spec")
        need_text(self.data_path, "--data_path")
        need_text(self.results_dir, "--results_dir")
        need_text(self.model_cache_dir, "--model_cache_dir")
        need_count(self.bench_steps, "--bench_steps", 1, 10**5)
        need_count(self.bench_warmup_steps, "--bench_warmup_steps", 0, 10**5)
        need_count(self.rounds, "--rounds", 1, 1000)
        need_count(self.nproc_per_node, "--nproc_per_node", 1, 1024)
        need_count(self.per_device_train_batch_size, "--per_device_train_batch_size", 1, 65536)
        need_count(self.max_length, "--max_length", 17, 10**6)
        need_count(self.seed, "--seed", 0, 2**32 - 1)
        need_number(self.learning_rate, "--learning_rate", 0, 1, low_open=True)
        need(self.experts_implementation in (None, "eager", "batched_mm", "grouped_mm"),
             f"--experts_implementation must be eager, batched_mm or grouped_mm, got {shown(self.experts_implementation)}")
        need_text(self.optim, "--optim")
        need_file_tag(self.tag)
        need(self.model_spec == "tiny" or self.model_spec in SPECS or _is_dir(self.model_spec),
             f"--model_spec must be tiny, a local model dir, or one of {sorted(SPECS)}; got {shown(self.model_spec)}")
        for spec in self.backends:
            backend = Backend.parse(spec)
            batch, _ = settings_for(self, spec)
            need(batch >= 1, f"--backend_batch_size / --per_device_train_batch_size for {spec}: must be positive, "
                 f"got {batch}")
            need(not (backend.is_unsloth and not torch.cuda.is_available()),
                 "--backends unsloth needs an NVIDIA GPU (Unsloth imports only with CUDA)")
            need(not (backend.triton_mamba_ops and not torch.cuda.is_available()),
                 "--backends hf+triton needs an NVIDIA GPU (its Mamba2 ops are Triton kernels)")
            need(not (self.in_memory and backend.is_unsloth),
                 "--in_memory: Unsloth loads only from a saved model dir; bench it without --in_memory")
        need(not (self.nproc_per_node > 1 and torch.cuda.is_available()
                  and torch.cuda.device_count() < self.nproc_per_node),
             f"--nproc_per_node {self.nproc_per_node}: this machine has {torch.cuda.device_count()} GPU(s)")
        for name, low in (("bench_steps", 1), ("rounds", 1), ("bench_warmup_steps", 0), ("max_length", 17),
                          ("nproc_per_node", 1)):
            need(getattr(self, name) >= low, f"--{name} must be >= {low}, got {getattr(self, name)}")
        need(0 <= self.profile_step <= self.bench_steps,
             f"--profile_step must be 0 (the last) to --bench_steps ({self.bench_steps}), got {self.profile_step}")
        need(self.profile or not self.profile_step, "--profile_step needs --profile true")
        need(not self.in_memory or self.model_spec in ("tiny", *SPECS),
             f"--in_memory builds tiny or {sorted(SPECS)}; got --model_spec {shown(self.model_spec)}")


def _is_dir(path: str) -> bool:
    try:
        return Path(path).is_dir()
    except OSError:  # a name too long for the file system is no directory
        return False


def build_random_model(spec: str, cache_dir: str | Path, seed: int = 0) -> Path:
    """Nemotron-3-Nano widths, random bf16 weights, first N layers of the hybrid pattern; saved once.

    The weights are those `build_in_memory` makes on the same device with the same seed (created in bf16 on
    the GPU: nano-full never exists in fp32), so `--in_memory` runs train the same model.
    """
    import torch

    from medlora.model import write_model_dir

    if spec not in SPECS:
        raise MedloraError(f"--model_spec must be tiny, a local dir, or one of {sorted(SPECS)}; got {shown(spec)}")

    def write(tmp: Path) -> None:  # single process: save_pretrained's rank-0 rule is no concern here
        model, tokenizer = build_in_memory(spec, seed, "cuda" if torch.cuda.is_available() else None)
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)  # ids < 2048 fit any vocabulary; lengths differ from Nemotron's
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    stamp = {"spec": spec, "pattern": SPECS[spec], "seed": seed, "init": "build_in_memory"}
    return write_model_dir(Path(cache_dir) / spec, stamp, write)


def model_path_for(args: BenchArguments) -> str:
    if args.model_spec == "tiny":
        from medlora.model import build_tiny_model

        return str(build_tiny_model(Path(args.model_cache_dir) / "tiny"))
    if Path(args.model_spec).is_dir():
        return args.model_spec
    return str(build_random_model(args.model_spec, args.model_cache_dir, args.seed))


def active_params(model) -> dict[str, int]:
    """Parameters one token meets (routed experts scaled by top_k / n_experts); input embeddings excluded.
    `lora_active`: the same count over the LoRA factors (a routed expert's A and B meet top_k / n_experts of the
    tokens)."""
    config = model.config
    top_k, n_exp = getattr(config, "num_experts_per_tok", 1), getattr(config, "n_routed_experts", 1)
    total = active = lora_active = 0
    from medlora.quant import logical_numel

    for name, param in model.named_parameters():
        n = logical_numel(param)  # a 4-bit nn.Linear (--load_in_4bit) holds two values a byte
        routed = ".experts." in name and "shared_experts" not in name
        if "lora_" in name:
            # PEFT's target_parameters wrappers hold the routed experts' factors as [E*r, ...] 2-D matrices
            lora_active += n * top_k // n_exp if routed else n
            continue
        total += n
        if "embed_tokens" in name or "embeddings" in name:
            continue
        active += n * top_k // n_exp if routed and param.dim() == 3 else n
    return {"total": total, "active": active, "lora_active": lora_active}


FLOPS_FORMULAS = {
    "lora": "4*N_active + 6*N_lora_active + 12*L_attn*d_attn*T: forward 2N and input gradients 2N through the frozen "
            "weights (they get no weight gradient), forward, input and weight gradients (6 per parameter) of the "
            "LoRA factors, attention scores and values forward+backward; recomputation by checkpointing not counted",
    "6n": "6*N_active + 12*L_attn*d_attn*T: the full fine-tuning convention of NVIDIA's and PaLM's MFU tables "
          "(every weight gets a gradient), for comparison with them",
}


def flops_per_token(model, seq_len: float, convention: str = "6n") -> float:
    """Model FLOPs per trained token (see FLOPS_FORMULAS); N counts routed experts as top_k / n_experts and
    excludes the input embeddings (a lookup)."""
    config = model.config
    n_attn = sum(1 for t in config.layers_block_type if t == "full_attention")
    d_attn = config.num_attention_heads * config.head_dim
    params = active_params(model)
    attention = 12 * n_attn * d_attn * seq_len
    if convention == "lora":
        return 4 * params["active"] + 6 * params["lora_active"] + attention
    return 6 * params["active"] + attention


def peak_tflops(gpu_name: str | None) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if gpu_name and key in gpu_name:
            return value
    return None


def per_backend(entries: list[str], spec: str, default, cast, option: str):
    for entry in entries:
        name, sep, value = entry.partition("=")
        if not sep:
            raise ConfigError(f"--{option}: {shown(entry)} is not backend=value")
        if name == spec:
            try:
                return cast(value)
            except ValueError:
                raise ConfigError(f"--{option}: {shown(entry)}: bad value {shown(value)}") from None
    return default


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise ValueError(text)


def _checkpointing(text: str) -> bool | tuple[str, ...]:
    """true / false, or block kinds joined by '+' (selective checkpointing, backend fast)."""
    from medlora.fast import CHECKPOINT_BLOCKS

    try:
        return _bool(text)
    except ValueError:
        kinds = tuple(text.split("+"))
        if not set(kinds) <= set(CHECKPOINT_BLOCKS):
            raise ValueError(text) from None
        return kinds


def settings_for(args: BenchArguments, spec: str) -> tuple[int, bool | tuple[str, ...]]:
    from medlora.backend import Backend

    checkpointing = per_backend(args.backend_gradient_checkpointing, spec, args.gradient_checkpointing,
                                _checkpointing, "backend_gradient_checkpointing")
    if isinstance(checkpointing, tuple) and not Backend.parse(spec).is_fast:
        raise MedloraError(f"--backend_gradient_checkpointing {spec}={'+'.join(checkpointing)}: block kinds "
                           "(selective checkpointing) are for fast backends; use true or false")
    return (per_backend(args.backend_batch_size, spec, args.per_device_train_batch_size, int, "backend_batch_size"),
            checkpointing)


# ---------------------------------------------------------------- worker (one backend, one process)


def bench_sft_config(args: BenchArguments, backend, batch: int, checkpointing, output_dir: str):
    """The SFTConfig a bench worker trains with: the bench's measuring choices (no eval, no saves, a sequential
    sampler, constant LR), then `trainer.build_sft_config` — the rules every `medlora train` run follows."""
    import torch
    from trl import SFTConfig

    from medlora.trainer import build_sft_config

    cuda = torch.cuda.is_available()
    raw = SFTConfig(
        output_dir=output_dir, max_steps=args.bench_warmup_steps + args.bench_steps,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        gradient_checkpointing=bool(checkpointing), bf16=cuda, use_cpu=not cuda, optim=args.optim,
        max_length=args.max_length, report_to="none", save_strategy="no", eval_strategy="no", logging_steps=10_000,
        train_sampling_strategy="sequential", dataloader_num_workers=0, seed=args.seed, disable_tqdm=True,
    )
    return build_sft_config(raw, backend, say=lambda *_: None)


def bench_model(args: BenchArguments, backend, lora: LoraArguments, checkpointing, device):
    """(LoRA model, tokenizer, backend report) of one worker: built in memory on `device` (random weights, no
    disk), or loaded through `train`'s own path. `+nf4` backends get the 4-bit base of --load_in_4bit (medlora.quant)."""
    import torch

    from medlora.backends import load_for_training, wrap_for_training
    from medlora.config import ModelArguments

    if not args.in_memory:
        model_args = ModelArguments(model_name_or_path=model_path_for(args), load_in_4bit=backend.nf4_experts,
                                    experts_implementation=args.experts_implementation)
        return load_for_training(backend, model_args, lora, max_length=args.max_length,
                                 gradient_checkpointing=checkpointing, seed=args.seed, device=device)
    # +nf4: built block by block, each block's experts quantised at once: the bf16 model never exists
    model, tokenizer = build_in_memory(args.model_spec, args.seed, device, nf4_experts=backend.nf4_experts)
    if args.experts_implementation:
        model.set_experts_implementation(args.experts_implementation)
    if backend.nf4_experts:
        from medlora.model import quantize_for_training

        quantize_for_training(model)  # the experts are NF4 already; the linear layers now
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    model, report = wrap_for_training(backend, model, lora, checkpointing)
    return model, tokenizer, {"model": f"built in memory (random, seed {args.seed})", **report}


def run_worker(args: BenchArguments, lora: LoraArguments, spec: str) -> dict[str, Any]:
    from medlora.backend import Backend

    backend = Backend.parse(spec)
    batch, checkpointing = settings_for(args, spec)
    if backend.is_unsloth:
        from medlora.backends import require_unsloth

        require_unsloth()  # first: Unsloth must patch transformers/TRL before they are imported
    import torch
    from transformers import TrainerCallback

    from medlora import runinfo
    from medlora.backends import set_sdpa_cudnn
    from medlora.trainer import build_trainer

    cuda = torch.cuda.is_available()
    sdpa_cudnn = set_sdpa_cudnn(backend, args.sdpa_cudnn)  # process-wide, and a worker is one backend's process
    world = runinfo.world_size()
    device = torch.device("cuda", runinfo.local_rank()) if cuda else None
    started = time.time()
    model, tokenizer, report = bench_model(args, backend, lora, checkpointing, device)
    load_s = time.time() - started
    steps = args.bench_warmup_steps + args.bench_steps
    dataset, too_long, reused = bench_dataset(args, tokenizer, steps, batch * world)
    config = bench_sft_config(args, backend, batch, checkpointing, tempfile.mkdtemp(prefix="medlora-bench-"))
    step_times: list[float] = []
    step_causes: list[dict[str, Any]] = []  # per step: what can make one step slow (StepCauses)
    causes = StepCauses(device if cuda else None)
    profile: list[dict[str, Any]] = []
    profile_detail: dict[str, Any] = {}
    # index into step_times of the profiled step: by default the last, after the timed ones are settled
    profiled = args.bench_warmup_steps + args.profile_step - 1 if args.profile_step else steps - 1

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            causes.begin()
            self.profiler = None
            if args.profile and len(step_times) == profiled:
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if cuda else []), record_shapes=True)
                self.profiler.__enter__()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            step_causes.append(causes.end())
            if self.profiler is None:
                step_times.append(time.perf_counter() - self.t0)
                return
            self.profiler.__exit__(None, None, None)
            step_times.append(time.perf_counter() - self.t0)  # profiled: reported, not timed (see timed_indices)
            profile.extend(top_kernels(self.profiler, cuda))
            profile_detail.update(profile_breakdown(self.profiler, cuda, step_times[-1]))

    trainer = build_trainer(model, tokenizer, config, dataset, callbacks=[StepTimer()])  # train's trainer class
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    before_train = torch.cuda.memory_allocated(device) if cuda else None
    with causes:
        trainer.train()
    # sequential sampler, no accumulation: global step i trains examples [i*B*W, (i+1)*B*W), rank r the r-th
    # batch of B among them (accelerate's batch-sampler sharding); padding is per rank's batch
    b = batch
    lengths = [len(x) for x in dataset["input_ids"]]
    trained = [sum(m) for m in dataset["completion_mask"]]
    per_step = []
    for i in range(steps):
        chunk = range(i * b * world, (i + 1) * b * world)
        padded = sum(b * max(lengths[j * b:(j + 1) * b]) for j in range(i * world, (i + 1) * world))
        per_step.append((sum(lengths[k] for k in chunk), sum(trained[k] for k in chunk), padded))
    return {
        "backend": spec, "batch_size": batch, "world_size": world, "load_s": round(load_s, 1),
        "sdpa_cudnn": sdpa_cudnn,
        "step_times": step_times,
        "step_causes": step_causes,
        "tokens_per_step": per_step[args.bench_warmup_steps:],
        "timed_from_step": args.bench_warmup_steps,
        "profiled_step": profiled if args.profile else None,
        "profile_top_kernels": profile,
        "profile_breakdown": profile_detail,
        "mean_tokens_per_sample": statistics.fmean(lengths),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
        "memory_breakdown": memory_breakdown(model, trainer.optimizer, before_train,
                                             torch.cuda.max_memory_allocated(device) if cuda else None),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "params": active_params(model),
        "flops_per_token": flops_per_token(model, statistics.fmean(lengths)),
        "flops_per_token_lora": flops_per_token(model, statistics.fmean(lengths), "lora"),
        "too_long_left_out": len(too_long),
        "examples_reused": reused,
        "gradient_checkpointing": "unsloth" if backend.is_unsloth and checkpointing
        else "+".join(checkpointing) if isinstance(checkpointing, tuple) else checkpointing,
        "backend_report": report,
    }


def bench_dataset(args: BenchArguments, tokenizer, steps: int, step_examples: int):
    """(tokenised dataset of exactly steps x step_examples examples, questions left out as too long, examples
    used twice): a global step takes `batch` examples on every rank; data shorter than that is cycled."""
    from medlora.data import load_medmcqa, tokenize_rows
    from medlora.formatting import FormatOptions

    rows, _ = load_medmcqa(args.data_path, evaluation=True)
    need = steps * step_examples
    dataset, too_long = tokenize_rows(rows[: need + 200], tokenizer,
                                      FormatOptions("plain", include_explanation=args.include_explanation),
                                      args.max_length, "bench")
    if len(dataset) < step_examples:
        raise MedloraError(f"{args.data_path}: {len(dataset)} usable examples, one bench step needs {step_examples}")
    reused = max(0, need - len(dataset))
    if reused:  # e.g. b192 x 26 steps on MedMCQA dev (4,183): later steps repeat earlier batches, shapes included
        print(f"bench: {args.data_path} has {len(dataset)} usable examples for {steps} steps of {step_examples}: "
              f"{reused} examples are used a second time", flush=True)
    return dataset.select([i % len(dataset) for i in range(need)]), too_long, reused


class StepCauses:
    """What makes one training step slower than its neighbours, counted per step: Python's garbage collector
    (a full collection walks every tracked object, the model's modules and tensors included), new CUDA memory
    segments (cudaMalloc synchronises; a batch of a new length can need new blocks), the allocator's
    free-and-retry after a failed allocation (near the memory limit), and Triton kernels compiled or loaded from
    the disk cache during the step (a new integer specialisation or autotuning key: a new variant mid-run),
    Triton autotuners that benchmarked their configurations for a new key (each config run several times), and
    torch.compile (dynamo) compilations, the lazily compiled backward included (a recompile on a new shape).
    Triton's hooks see kernels launched through `triton.jit` (mamba_ssm, fla, medlora), not inductor's."""

    def __init__(self, device=None):
        self.device, self.gc_s, self.gc_runs, self.started = device, 0.0, [0, 0, 0], None
        self.mark: tuple = ()
        self.compiles: list[tuple[str, float]] = []  # (kernel, seconds) in the order Triton built them
        self.autotunes: list[tuple[str, float]] = []  # (kernel, seconds with its compiles) per new tuning key
        self.dynamo: list[tuple[str, float]] = []  # (trigger, seconds) per torch.compile compilation
        self._knobs, self._hooks, self._compile_started = None, (None, None), None
        self._autotuner, self._autotuner_run, self._dynamo_handler, self._dynamo_started = None, None, None, None

    def _gc(self, phase, info):
        if phase == "start":
            self.started = time.perf_counter()
        elif self.started is not None:
            self.gc_s += time.perf_counter() - self.started
            self.gc_runs[info["generation"]] += 1
            self.started = None

    def _triton_before(self, **hook):  # Triton's jit_cache_hook: a truthy return would skip the compile
        self._compile_started = time.perf_counter()
        return self._hooks[0](**hook) if self._hooks[0] else None

    def _triton_after(self, **hook):  # jit_post_compile_hook
        began = self._compile_started if self._compile_started is not None else time.perf_counter()
        self.compiles.append((hook["fn"].name, time.perf_counter() - began))
        self._compile_started = None
        return self._hooks[1](**hook) if self._hooks[1] else None

    def _dynamo_start(self, args):
        self._dynamo_started = time.perf_counter()

    def _dynamo_end(self, args):
        began = self._dynamo_started if self._dynamo_started is not None else time.perf_counter()
        self.dynamo.append((getattr(args.callback_trigger, "name", str(args.callback_trigger)).lower(),
                            time.perf_counter() - began))
        self._dynamo_started = None

    def _watch_autotuner(self, autotuner) -> None:
        """Wrap Autotuner.run (class-wide, put back on exit): a run that adds a key to the tuner's cache tuned."""
        original, causes = autotuner.run, self

        def run(tuner, *args, **kwargs):
            known, began = len(getattr(tuner, "cache", ())), time.perf_counter()
            try:
                return original(tuner, *args, **kwargs)
            finally:
                if len(getattr(tuner, "cache", ())) > known:
                    name = getattr(getattr(tuner, "base_fn", None), "__name__", type(tuner).__name__)
                    causes.autotunes.append((name, time.perf_counter() - began))

        self._autotuner, self._autotuner_run, autotuner.run = autotuner, original, run

    def __enter__(self):
        gc.callbacks.append(self._gc)
        try:
            from torch._dynamo import callback_handler
        except ImportError:  # a torch without dynamo: nothing to count
            pass
        else:
            callback_handler.register_start_callback(self._dynamo_start)
            callback_handler.register_end_callback(self._dynamo_end)
            self._dynamo_handler = callback_handler
        try:
            from triton import knobs
            from triton.runtime.autotuner import Autotuner
        except ImportError:  # CPU installs without Triton: nothing to count
            return self
        self._knobs, runtime = knobs, knobs.runtime
        self._hooks = (runtime.jit_cache_hook, runtime.jit_post_compile_hook)  # chained, put back on exit
        runtime.jit_cache_hook, runtime.jit_post_compile_hook = self._triton_before, self._triton_after
        self._watch_autotuner(Autotuner)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._gc)
        if self._dynamo_handler is not None:
            self._dynamo_handler.remove_start_callback(self._dynamo_start)
            self._dynamo_handler.remove_end_callback(self._dynamo_end)
            self._dynamo_handler = None
        if self._knobs is not None:
            self._knobs.runtime.jit_cache_hook, self._knobs.runtime.jit_post_compile_hook = self._hooks
            self._knobs = None
        if self._autotuner is not None:
            self._autotuner.run, self._autotuner = self._autotuner_run, None

    def _allocator(self) -> tuple[int, int]:
        if self.device is None:
            return 0, 0
        import torch

        stats = torch.cuda.memory_stats(self.device)
        return stats.get("num_device_alloc", 0), stats.get("num_alloc_retries", 0)

    def begin(self) -> None:
        self.mark = (self.gc_s, list(self.gc_runs), *self._allocator(), len(self.compiles), len(self.autotunes),
                     len(self.dynamo))

    def end(self) -> dict[str, Any]:
        gc_s, runs, mallocs, retries, compiled, tuned, traced = self.mark
        now_mallocs, now_retries = self._allocator()
        built, tunes, graphs = self.compiles[compiled:], self.autotunes[tuned:], self.dynamo[traced:]
        return {"gc_s": round(self.gc_s - gc_s, 4),
                "gc_collections": [a - b for a, b in zip(self.gc_runs, runs)],  # generations 0, 1, 2
                "gc_frozen_objects": gc.get_freeze_count(),  # out of the collector's reach (the trainer's train)
                "cuda_mallocs": now_mallocs - mallocs, "alloc_retries": now_retries - retries,
                "triton_compiles": len(built), "triton_compile_s": round(sum(s for _, s in built), 4),
                "triton_kernels": sorted({name for name, _ in built})[:20],
                "triton_autotunes": len(tunes), "triton_autotune_s": round(sum(s for _, s in tunes), 4),
                "triton_autotuned": sorted({name for name, _ in tunes})[:20],
                "torch_compiles": len(graphs), "torch_compile_s": round(sum(s for _, s in graphs), 4),
                "torch_compile_triggers": sorted({trigger for trigger, _ in graphs})}


def _tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a zero-stride NF4 placeholder counts its 2 bytes)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(seen.values())


def memory_breakdown(model, optimizer, before_train: int | None, peak: int | None) -> dict[str, Any]:
    """Where the peak went, GiB: the frozen weights as stored (NF4 experts at their packed size), the LoRA
    parameters, their gradients (one per trainable value, in its dtype), the optimizer's state, all counted from
    the tensors themselves; on a GPU also what was allocated before the first step and the rest of the peak
    (activations, checkpoint recomputes, transient dequantised experts, allocator blocks)."""
    from medlora.quant import is_4bit

    gib = 2**-30
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    frozen += [p.quant_state.absmax for p in model.parameters() if is_4bit(p)]
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    state = [v for per_param in getattr(inner, "state", {}).values() for v in per_param.values()
             if hasattr(v, "untyped_storage")]
    parts = {"weights": _tensor_bytes(frozen), "lora": _tensor_bytes(trainable),
             "lora_grads": sum(p.numel() * p.element_size() for p in trainable), "optimizer": _tensor_bytes(state)}
    out: dict[str, Any] = {f"{k}_gib": round(v * gib, 6) for k, v in parts.items()}  # 6: tiny models too
    out["how"] = "weights/lora/optimizer: bytes of their tensors; lora_grads: one value per trainable parameter"
    if peak is not None:
        static = sum(parts.values())
        out["allocated_before_first_step_gib"] = round(before_train * gib, 3)
        out["activations_and_transient_gib"] = round((peak - static) * gib, 3)  # the peak less the static parts
    return out


def top_kernels(profiler, cuda: bool, limit: int = 25) -> list[dict[str, Any]]:
    """The operations/kernels that took the most device (or CPU) time in the profiled step."""
    events = profiler.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    rows = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:limit]
    return [{"name": e.key[:120], "ms": round(getattr(e, attr) / 1000, 3), "share": round(getattr(e, attr) / total, 4),
             "calls": e.count} for e in rows]


def _origin(event) -> str:
    """Where a profiled op came from: the medlora block it ran in (forward or checkpoint recompute), the
    autograd node whose backward launched it, and the op that called it."""
    block, node = None, None
    parent = event.cpu_parent
    caller = parent.name if parent is not None and not parent.name.startswith(("medlora.", "autograd::")) else None
    while parent is not None:
        name = parent.name
        if block is None and name.startswith("medlora."):
            block = name
        elif node is None and name.startswith("autograd::engine::evaluate_function: "):
            node = name.split(": ", 1)[1]
        parent = parent.cpu_parent
    return " / ".join(x for x in (block, f"backward of {node}" if node else None, caller) if x) or "top level"


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def device_idle(events, step_s: float, gap_us: float = 20.0, top: int = 8) -> dict[str, Any]:
    """Where the GPU waited in the profiled step: every gap of >= `gap_us` between device activities, each
    blamed on a host sync that ended inside it (the queue drained, the host then had to refill it) or else on
    the host op running when the device resumed (the host fell behind: launch and Python overhead)."""
    import bisect
    import collections

    device = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type.name == "CUDA")
    if not device:
        return {}
    cpu = [e for e in events if e.device_type.name == "CPU"]
    syncs = sorted(((e.time_range.end, e) for e in cpu if e.name.startswith(SYNC_CALLS)), key=lambda x: x[0])
    ops = sorted(((e.time_range.start, e) for e in cpu if e.name.startswith("aten::")), key=lambda x: x[0])
    sync_ends, op_starts = [t for t, _ in syncs], [t for t, _ in ops]
    gaps, busy_end = [], device[0][1]
    for start, end in device[1:]:
        if start - busy_end >= gap_us:
            gaps.append((busy_end, start))
        busy_end = max(busy_end, end)
    by_cause: dict[str, float] = collections.defaultdict(float)
    largest = []
    for a, b in gaps:
        i = bisect.bisect_left(sync_ends, a - 5.0)
        if i < len(syncs) and syncs[i][0] <= b:
            cause = f"after sync: {_origin(syncs[i][1])} / {syncs[i][1].name}"
        else:
            j = bisect.bisect_right(op_starts, b) - 1
            cause = f"host: {_origin(ops[j][1])} / {ops[j][1].name}" if j >= 0 else "host: step start"
        by_cause[cause] += (b - a) / 1000
        largest.append({"ms": round((b - a) / 1000, 3), "cause": cause})
    idle_ms = sum((b - a) for a, b in gaps) / 1000
    return {"idle_ms": round(idle_ms, 1), "gaps": len(gaps), "gap_threshold_us": gap_us,
            "outside_first_to_last_kernel_ms": round(step_s * 1000 - (busy_end - device[0][0]) / 1000, 1),
            "idle_after_sync_ms": round(sum(v for k, v in by_cause.items() if k.startswith("after sync")), 1),
            "host_syncs": dict(collections.Counter(f"{_origin(e)} / {e.name}" for _, e in syncs).most_common(top)),
            "idle_by_cause_ms": {k: round(v, 2) for k, v in sorted(by_cause.items(), key=lambda kv: -kv[1])[:top]},
            "largest_gaps": sorted(largest, key=lambda g: -g["ms"])[:top]}


def profile_breakdown(profiler, cuda: bool, step_s: float, ops: int = 6, origins: int = 6) -> dict[str, Any]:
    """Totals of the profiled step (ops dispatched, kernels launched, device-busy time against wall time: a step
    whose device is idle much of the time is bound by the host) and, for the ops with the most calls or device
    time, where their calls came from (`_origin`)."""
    import collections

    events = [e for e in profiler.events() if e.device_type.name == "CPU"]
    kernels = [k for e in events for k in e.kernels] if cuda else []
    busy_us = sum(k.duration for k in kernels)
    by_op: dict[str, list] = collections.defaultdict(list)
    for e in events:
        if e.name.startswith("aten::") and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::")):
            by_op[e.name].append(e)  # top-level aten ops only: an op's own sub-ops are its cost, not extra calls
    key = (lambda es: sum(e.device_time_total for e in es)) if cuda else len
    chosen = sorted(by_op, key=lambda n: key(by_op[n]), reverse=True)[:ops]
    chosen += [n for n in sorted(by_op, key=lambda n: len(by_op[n]), reverse=True)[:ops] if n not in chosen]
    chosen += [n for n in ("aten::_grouped_mm", "aten::mm", "aten::copy_") if n in by_op and n not in chosen]
    callers = {}
    for name in chosen:
        groups: dict[str, list] = collections.defaultdict(list)
        for e in by_op[name]:
            groups[_origin(e)].append(e)
        ranked = sorted(groups.items(), key=lambda kv: len(kv[1]), reverse=True)[:origins]
        callers[name] = {"calls": len(by_op[name]), "device_ms": round(sum(e.device_time_total for e in by_op[name])
                                                                         / 1000, 3),
                         "from": [{"origin": o, "calls": len(es),
                                   "device_ms": round(sum(e.device_time_total for e in es) / 1000, 3),
                                   # a library op that loops (e.g. a grouped GEMM's per-expert fallback) shows
                                   # as many children per call; shapes tell which call it is
                                   "children_per_call": round(sum(len(e.cpu_children) for e in es) / len(es), 1),
                                   "child_ops": dict(collections.Counter(c.name for e in es for c in e.cpu_children)
                                                     .most_common(3)),
                                   "shapes": [f"{shape} x{n}" for shape, n in collections.Counter(
                                       str(e.input_shapes) for e in es).most_common(3)]}
                                  for o, es in ranked]}
    idle = device_idle(list(profiler.events()), step_s) if cuda else {}
    return {"wall_s": round(step_s, 4), "aten_ops": sum(len(v) for v in by_op.values()), "device_idle": idle,
            "kernels_launched": len(kernels), "device_busy_s": round(busy_us / 1e6, 4),
            "device_busy_share": round(busy_us / 1e6 / step_s, 3) if step_s and cuda else None, "callers": callers}


# ---------------------------------------------------------------- driver


def timed_indices(run: dict[str, Any]) -> list[int]:
    """Indices into a worker's step_times that count: after the warm-up, without the profiled step."""
    return [i for i in range(run["timed_from_step"], len(run["step_times"])) if i != run.get("profiled_step")]


def timed_steps(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every timed step of every round: round, step, seconds, real and padded tokens (kept in the JSON, so an
    outlier can be traced afterwards: a new padded length, the first step of a round, ...)."""
    steps = []
    for round_index, run in enumerate(runs):
        start, causes = run["timed_from_step"], run.get("step_causes", [])
        for i in timed_indices(run):
            tokens = run["tokens_per_step"][i - start]
            steps.append({"s": round(run["step_times"][i], 4), "round": round_index + 1, "step": i + 1,
                          "tokens": tokens[0], "padded_tokens": tokens[2], **(causes[i] if i < len(causes) else {})})
    return steps


def slowest_step(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The slowest timed step over all rounds: which round and step, its seconds and tokens."""
    return max(timed_steps(runs), key=lambda step: step["s"], default={})


def summarise_backend(runs: list[dict[str, Any]], batch: int, gpu: str | None) -> dict[str, Any]:
    for outcome in ("oom", "failed"):
        if any(r.get(outcome) for r in runs):
            return {"backend": runs[0]["backend"], "batch_size": batch, outcome: True,
                    "error": next(r["error"] for r in runs if r.get(outcome)), "tokens_per_s": None}
    times, tokens, trained, padded = [], 0, 0, 0
    for run in runs:
        for i in timed_indices(run):
            t, tr, pad = run["tokens_per_step"][i - run["timed_from_step"]]
            times.append(run["step_times"][i])
            tokens, trained, padded = tokens + t, trained + tr, padded + pad
    total = sum(times)
    first = runs[0]
    tokens_per_s = tokens / total
    peak = peak_tflops(gpu)
    samples_per_s = batch * first.get("world_size", 1) * len(times) / total
    world = first.get("world_size", 1)
    return {
        "backend": first["backend"],
        "batch_size": batch,
        "world_size": world,
        "tokens_per_s": round(tokens_per_s, 1),
        "tokens_per_s_per_gpu": round(tokens_per_s / world, 1),
        "trained_tokens_per_s": round(trained / total, 1),
        "padded_tokens_per_s": round(padded / total, 1),
        "samples_per_s": round(samples_per_s, 3),
        "step_s": {"mean": round(statistics.fmean(times), 4), "median": round(statistics.median(times), 4),
                   "min": round(min(times), 4), "max": round(max(times), 4), "n": len(times),
                   "max_over_median": round(max(times) / statistics.median(times), 3),
                   "slowest": slowest_step(runs)},
        "steps": timed_steps(runs),
        # kernels the warm-up built, per round (its timed steps should then build none: `steps[*]`)
        **{f"warmup_{what}": [sum(c.get(what, 0) for c in r.get("step_causes", [])[:r["timed_from_step"]])
                              for r in runs] for what in ("triton_compiles", "triton_autotunes", "torch_compiles")},
        "peak_mem_gib": max((r["peak_mem_gib"] or 0) for r in runs) or None,
        "memory_breakdown": max(runs, key=lambda r: r["peak_mem_gib"] or 0).get("memory_breakdown"),  # the peak's
        # per GPU, two conventions (FLOPS_FORMULAS): what a LoRA step computes, and the 6N of full fine-tuning
        "mfu": round(tokens_per_s / world * first["flops_per_token"] / (peak * 1e12), 4) if peak else None,
        "mfu_lora": round(tokens_per_s / world * first["flops_per_token_lora"] / (peak * 1e12), 4)
        if peak and "flops_per_token_lora" in first else None,
        "flops_per_token": first["flops_per_token"],
        "flops_per_token_lora": first.get("flops_per_token_lora"),
        "mean_tokens_per_sample": round(first["mean_tokens_per_sample"], 1),
        "epoch_hours_medmcqa_train": round(MEDMCQA_TRAIN_QUESTIONS / samples_per_s / 3600, 2),
        "trainable_params": first["trainable_params"],
        "examples_reused": first.get("examples_reused", 0),  # the data had fewer examples than steps x batch
        "params": first["params"],
        "load_s": [r["load_s"] for r in runs],
        "gradient_checkpointing": first["gradient_checkpointing"],
        "sdpa_cudnn": first.get("sdpa_cudnn"),  # what the worker ran with (default off for hf and hf+triton)
        "backend_report": first["backend_report"],
        **({"profiled_step": first["profiled_step"] + 1, "profile_top_kernels": first["profile_top_kernels"],
            "profile_breakdown": first["profile_breakdown"]} if first.get("profiled_step") is not None else {}),
    }


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_bench(args: BenchArguments, lora: LoraArguments) -> Path:
    from medlora import runinfo
    from medlora.backend import Backend

    from medlora.data import load_medmcqa

    from medlora.outputs import check_writable

    args.validate()
    check_writable(Path(args.results_dir), "--results_dir")  # before minutes of GPU time, not after
    load_medmcqa(args.data_path, evaluation=True)  # a bad data file is reported here, not in every worker
    if not args.in_memory:
        model_path_for(args)  # build once, before the timed workers
    runs: dict[str, list] = {b: [] for b in args.backends}
    payload = json.dumps({"bench": asdict(args), "lora": asdict(lora)})
    gpu = runinfo.hardware().get("gpu")
    json_path = runinfo.new_result_path(args.results_dir, date.today().isoformat(), gpu,
                                        args.model_spec + (f"-{args.tag}" if args.tag else ""))
    for round_index in range(args.rounds):
        for backend in args.backends:  # alternate: hf, unsloth, hf, unsloth, ...
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
                result_path = fh.name
            cmd = [sys.executable, "-m", "medlora.benchmark", "--worker", backend, payload, result_path]
            if args.nproc_per_node > 1:  # DDP worker: torchrun starts one process per GPU
                cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc_per_node}",
                       f"--master_port={free_port()}", *cmd[1:]]
            print(f"bench round {round_index + 1}/{args.rounds}: {backend}", flush=True)
            proc = subprocess.run(cmd, text=True)
            if proc.returncode != 0:  # recorded, and the other backends still run: a long bench keeps its results
                runs[backend].append({"backend": backend, "failed": True,
                                      "error": f"worker exited {proc.returncode}; its output is in the log above"})
            else:
                runs[backend].append(json.loads(Path(result_path).read_text()))
            # written after every worker: a bench stopped half-way (a time limit) keeps what it measured
            out = write_results(args, lora, {b: r for b, r in runs.items() if r}, json_path)
    from medlora.bench_report import markdown_table

    print(markdown_table(out))
    print(f"wrote {json_path} (+ .md, .png)")
    failed = [r["backend"] for r in out["results"] if r.get("failed")]
    if failed:
        raise MedloraError(f"bench: worker(s) for {', '.join(failed)} failed (output above); the other backends' "
                           f"results are in {json_path}")
    return json_path


def write_results(args: BenchArguments, lora: LoraArguments, runs: dict[str, list], json_path: Path) -> dict:
    """The bench JSON (+ Markdown table and PNG chart) of the workers run so far."""
    from medlora import runinfo
    from medlora.backend import Backend
    from medlora.bench_report import markdown_table, plot

    hw = runinfo.hardware()
    gpu = hw.get("gpu")
    results = [summarise_backend(runs[b], settings_for(args, b)[0], gpu) for b in runs]
    for r in results:
        r["model"] = args.model_spec
    out = {
        "date": date.today().isoformat(), "gpu": gpu, "world_size": args.nproc_per_node,
        "versions": runinfo.versions(), "hardware": hw, "config": {"bench": asdict(args), "lora": asdict(lora)},
        "mfu_formula": "tokens/s per GPU * flops_per_token / peak_bf16 (dense bf16 peak of the GPU); mfu uses the "
                       "6n convention, mfu_lora the lora one; N_active counts routed experts as top_k/n_experts and "
                       "excludes input embeddings",
        "flops_formulas": FLOPS_FORMULAS,
        "complete": all(len(runs.get(b, [])) == args.rounds for b in args.backends),
        "results": results,
    }
    for base in results:  # every backend against the plain stacks it should beat
        if not Backend.parse(base["backend"]).is_fast and base["tokens_per_s"]:
            for r in results:
                if r["tokens_per_s"]:
                    r["speedup_vs_" + base["backend"]] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
    from medlora.outputs import write_atomic

    write_atomic(json_path, json.dumps(out, indent=2) + "\n")  # a full disk never leaves a half-written result
    write_atomic(json_path.with_suffix(".md"), markdown_table(out) + "\n")
    plot(out, json_path.with_suffix(".png"))
    return out


def _worker_main(argv: list[str]) -> None:
    import torch

    backend, payload, result_path = argv
    data = json.loads(payload)
    try:
        result = run_worker(BenchArguments(**data["bench"]), LoraArguments(**data["lora"]), backend)
    except torch.OutOfMemoryError as err:  # a measured outcome of this setting, not a crash of the bench
        result = {"backend": backend, "oom": True, "error": str(err).splitlines()[0]}
    from medlora import runinfo

    if runinfo.is_main_process():  # under torchrun, rank 0 reports (its clock, its GPU's peak memory)
        Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        from medlora.errors import main_guard

        main_guard(_worker_main)(sys.argv[2:])  # expected errors: one line and exit 2, as in the CLI
