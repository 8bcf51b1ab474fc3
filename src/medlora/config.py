"""Configuration: dataclasses that are both YAML keys and CLI flags (TRL / alignment-handbook style).

`parse_config(argv, sections)` reads `--config FILE.yaml`, then the flags; flags win. Every YAML key
must name a field of one of the sections (a typo is refused with a suggestion), and values are
type-checked by the same argparse types as the flags, with the file named in the message.
Training arguments are TRL's own `SFTConfig`, so `--output_dir`, `--max_steps`, `--save_steps`,
`--seed`, `--per_device_train_batch_size`, ... mean exactly what they mean in Transformers.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from medlora.backend import Backend
from medlora.fast import CHECKPOINT_BLOCKS, DEFAULT_LEVERS, LEVERS
from medlora.errors import ConfigError, MedloraError, bounded, main_guard, shown  # noqa: F401 - re-exported

TINY_MODEL = "tiny"
REAL_MODEL = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16"


def need(ok: bool, message: str) -> None:
    """A validator's one check: ConfigError with the message (which names the option) when `ok` is false."""
    if not ok:
        raise ConfigError(message)


def need_text(value: Any, option: str, optional: bool = False) -> None:
    """A path or name: not empty (None only where `optional`)."""
    if value is None and optional:
        return
    need(isinstance(value, str) and value.strip() != "", f"{option} is empty; give a value")


def need_file_tag(value: Any, option: str = "--tag") -> None:
    """A suffix that goes into a result file name: short, and no spaces, slashes or other path characters."""
    import re

    need(isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9._+-]{0,64}", value) is not None,
         f"{option} goes into the result file name: letters, digits and . _ + - only, at most 64; got {shown(value)}")


def need_count(value: Any, option: str, low: int = 1, high: int = 10**8, optional: bool = False) -> None:
    """A whole number in [low, high] (None only where `optional`). The upper bound refuses the absurd."""
    if value is None and optional:
        return
    need(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
         f"{option} must be a whole number from {low:,} to {high:,}, got {shown(value)}")


def need_number(value: Any, option: str, low: float, high: float = float("inf"), low_open: bool = False,
                optional: bool = False) -> None:
    """A finite number in [low, high] (or (low, high] where `low_open`)."""
    import math

    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        value > low if low_open else value >= low) and value <= high
    need(ok, f"{option} must be a finite number {'>' if low_open else '>='} {low:g}"
         + (f" and <= {high:g}" if high != float("inf") else "") + f", got {shown(value)}")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=TINY_MODEL,
        metadata={"help": f"Hub id (e.g. {REAL_MODEL}), local dir, or 'tiny' (random tiny Nemotron-H, built offline)."},
    )
    torch_dtype: str = field(default="auto", metadata={"help": "auto (bf16 on a bf16 GPU, else fp32), bfloat16, float32"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager, sdpa, flash_attention_2"})
    experts_implementation: str | None = field(
        default=None, metadata={"help": "MoE experts kernel: eager, batched_mm, grouped_mm (default: transformers')"}
    )
    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA with --backend fast: the routed experts (29.4 B of Nano's 31.6 B parameters) and every "
                "nn.Linear but the LM head in NF4 (medlora.quant), quantised as the checkpoint is read; embeddings, "
                "LM head and norms stay bf16"})
    revision: str | None = field(default=None, metadata={"help": "hub revision (branch, tag or commit)"})
    tiny_cache_dir: str = field(default="outputs/tiny-nemotron-h", metadata={"help": "where 'tiny' is built"})

    def validate(self) -> None:
        need_text(self.model_name_or_path, "--model_name_or_path")
        need_text(self.tiny_cache_dir, "--tiny_cache_dir")
        need_text(self.revision, "--revision", optional=True)
        need(self.attn_implementation in ("eager", "sdpa", "flash_attention_2", "flash_attention_3"),
             f"--attn_implementation must be eager, sdpa, flash_attention_2 or flash_attention_3, got "
             f"{shown(self.attn_implementation)}")
        need(self.torch_dtype in ("auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32"),
             f"--torch_dtype: unknown dtype {shown(self.torch_dtype)}")
        need(self.experts_implementation in (None, "eager", "batched_mm", "grouped_mm"),
             f"--experts_implementation must be eager, batched_mm or grouped_mm, got {shown(self.experts_implementation)}")


@dataclass
class LoraArguments:
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "up_proj", "down_proj"],
        metadata={"help": "nn.Linear names: attention q/k/v/o, Mamba in_proj, shared-expert up/down"},
    )
    lora_target_parameters: list[str] = field(
        default_factory=lambda: ["experts.up_proj", "experts.down_proj"],
        metadata={"help": "fused 3-D routed-expert parameters (PEFT target_parameters); pass [] to leave them frozen"},
    )
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha / sqrt(r)"})

    def validate(self) -> None:
        need(self.lora_r > 0, f"--lora_r must be positive, got {self.lora_r}")
        need_count(self.lora_r, "--lora_r", 1, 4096)
        need(self.lora_alpha > 0, f"--lora_alpha must be positive, got {self.lora_alpha}")
        need_count(self.lora_alpha, "--lora_alpha", 1, 10**6)
        for name in ("lora_target_modules", "lora_target_parameters"):
            for target in getattr(self, name):
                need_text(target, f"--{name} (an entry)")
        need(0 <= self.lora_dropout < 1, f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(bool(self.lora_target_modules or self.lora_target_parameters), "no LoRA targets given")
        forbidden = {"out_proj", "conv1d"} & {t.split(".")[-1] for t in self.lora_target_modules}
        need(not forbidden, f"--lora_target_modules: {sorted(forbidden)} cannot be LoRA targets on nemotron_h "
             "(the Mamba2 code passes conv1d.weight to the scan as a plain tensor, and with mamba kernels installed "
             "the fused kernel reads out_proj.weight directly: a LoRA there gets no gradient; see AGENTS.md)")


@dataclass
class DataArguments:
    data_path: str = field(
        default="data/sample/medmcqa_sample.jsonl",
        metadata={"help": "openlifescienceai/medmcqa, a .jsonl/.json/.parquet/.csv file, or a `medlora prepare` dir",
                  "aliases": ["--data"]},
    )
    eval_data_path: str | None = field(
        default=None, metadata={"help": "separate eval file or hub id; default: split eval_fraction off data_path"}
    )
    train_split: str = field(default="train", metadata={"help": "hub split for training"})
    eval_split: str = field(default="validation", metadata={"help": "hub split for evaluation"})
    cop_base: str = field(default="auto", metadata={"help": "answer numbering: auto, 0 (hub, 0-3) or 1 (official, 1-4)"})
    skip_invalid: bool = field(default=False, metadata={"help": "keep valid rows, write skipped.jsonl, go on"})
    eval_fraction: float = field(default=0.1, metadata={"help": "share of questions held out for eval"})
    split_seed: int = field(default=1234, metadata={"help": "seed of the stratified split"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use at most this many training rows"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use at most this many eval rows"})
    style: str = field(default="plain", metadata={"help": "plain (lm-eval medmcqa prompt) or chat (chat template)"})
    include_option_text: bool = field(default=True, metadata={"help": "train on 'A. <option>' rather than 'A'"})
    include_explanation: bool = field(default=False, metadata={"help": "append the row's explanation to the answer"})
    add_bos_token: bool | None = field(default=None, metadata={
        "help": "prepend BOS to every prompt: default (unset) follows the tokenizer's own default, as "
                "lm-evaluation-harness 0.4.13 encodes; true or false overrides it"})
    stop_token: str = field(default="auto", metadata={
        "help": "plain style: the token that ends every trained answer. auto: the tokenizer's eos if the model has "
                "trained it (non-zero embedding and LM-head rows), else the document separator </s> (the "
                "Nemotron-3 Base eos <|im_end|> is untrained); or name one. Chat style: the template's end of turn"})
    enable_thinking: bool = field(default=False, metadata={
        "help": "chat style: passed to the chat template. Off, Nemotron-3's template closes the think block in "
                "the prompt (<think></think>, masked); answers never contain think tags"})
    general_eval_data: str | None = field(default=None, metadata={
        "help": "forgetting guard: a general-knowledge MCQ file (MedMCQA format, any subjects; offline sample: "
                "data/sample/general_mcq_sample.jsonl) scored before training, at every eval and at the end"})
    mix_data: str | None = field(default=None, metadata={
        "help": "replay: general MCQ rows mixed into training at --mix_ratio (the 80:20 recipe: --mix_ratio 0.2)"})
    mix_ratio: float = field(default=0.0, metadata={
        "help": "share of the training examples drawn from --mix_data (seeded by --split_seed)"})

    def validate(self) -> None:
        need_text(self.general_eval_data, "--general_eval_data", optional=True)
        need_text(self.mix_data, "--mix_data", optional=True)
        need_number(self.mix_ratio, "--mix_ratio", 0, 0.9)
        need((self.mix_ratio > 0) == bool(self.mix_data), "--mix_data and --mix_ratio go together: a replay file "
             "and the share of training examples it supplies (e.g. --mix_ratio 0.2)")
        need_text(self.data_path, "--data_path")
        need_text(self.eval_data_path, "--eval_data_path", optional=True)
        need_text(self.train_split, "--train_split")
        need_text(self.eval_split, "--eval_split")
        need_text(self.stop_token, "--stop_token")
        need_count(self.split_seed, "--split_seed", 0, 2**32 - 1)
        need(self.style in ("plain", "chat"), f"--style must be 'plain' or 'chat', got {shown(self.style)}")
        need(self.cop_base in ("auto", "0", "1"), f"--cop_base must be auto, 0 or 1, got {shown(self.cop_base)}")
        need(0 < self.eval_fraction < 1, f"--eval_fraction must be in (0, 1), got {self.eval_fraction}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            need(value is None or value > 0, f"--{name} must be positive, got {value}")
            need_count(value, f"--{name}", optional=True)


@dataclass
class RunArguments:
    backend: str = field(default="hf", metadata={"help": "hf (Transformers + PEFT + TRL), unsloth, or fast "
                                                         "(medlora's padding-free Triton path; see AGENTS.md)"})
    fast_levers: list[str] = field(default_factory=lambda: list(DEFAULT_LEVERS),
                                   metadata={"help": "backend fast: kernels to use (the rest run PyTorch references); "
                                                     f"any of {', '.join(LEVERS)}"})
    fast_gpu_arch: str = field(default="auto", metadata={
        "help": "backend fast: pick kernels as for this GPU architecture: auto (this GPU's) or sm80 (the A100 "
                "path: per-expert MoE GEMM loop instead of torch's sm90+ grouped GEMM), to measure it anywhere"})
    fast_checkpoint_blocks: list[str] = field(default_factory=lambda: list(CHECKPOINT_BLOCKS), metadata={
        "help": "backend fast with --gradient_checkpointing: which block kinds recompute their activations "
                "(selective checkpointing), any of " + ", ".join(CHECKPOINT_BLOCKS)})
    sdpa_cudnn: bool | None = field(default=None, metadata={
        "help": "SDPA's cuDNN attention backend in training (torch.backends.cuda.enable_cudnn_sdp): default off "
                "for --backend hf (on an H200 it made hf's attention build a plan per new length, and hf with the "
                "Triton Mamba ops 1.8x slower), torch's default otherwise; fast makes no SDPA call"})
    fsdp2: bool = field(default=False, metadata={
        "help": "shard the model over the ranks with FSDP2 (fully_shard per block) when one GPU cannot hold a "
                "replica; backend hf, under torchrun; checkpoints hold the adapter only (no resume)"})
    eval_accuracy_samples: int = field(
        default=200, metadata={"help": "eval questions scored for accuracy at each evaluation (0 = all)"}
    )
    early_stopping_patience: int = field(default=0, metadata={
        "help": "stop after this many evaluations without improving --metric_for_best_model (0: off; transformers' "
                "EarlyStoppingCallback)"})
    early_stopping_threshold: float = field(default=0.0, metadata={
        "help": "an evaluation counts as an improvement only if it beats the best by more than this"})
    max_forgetting: float | None = field(default=None, metadata={
        "help": "forgetting guard: stop the run (checkpoint kept) when general accuracy (--general_eval_data) "
                "drops more than this below the base model's, e.g. 0.05"})
    audit: bool = field(default=True, metadata={"help": "label-mask and gradient-flow audits before step 1"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace a previous run in output_dir (only medlora's own files, its checkpoints too)"})
    eval_batch_size: int = field(default=8, metadata={"help": "questions per forward pass when scoring"})

    def validate(self, train: Any = None) -> None:
        backend = Backend.from_run(self)  # refuses an unknown --backend
        need(self.eval_accuracy_samples >= 0, "--eval_accuracy_samples must be >= 0")
        need(self.eval_batch_size > 0, "--eval_batch_size must be positive")
        need_count(self.eval_accuracy_samples, "--eval_accuracy_samples", 0)
        need_count(self.eval_batch_size, "--eval_batch_size", 1, 4096)
        unknown = set(self.fast_levers) - set(LEVERS)
        need(not unknown, f"--fast_levers: unknown {sorted(unknown)}; choose from {LEVERS}")
        need(not (backend.is_fast and "offload_checkpoints" in self.fast_levers and train is not None
                  and not (train.gradient_checkpointing and self.fast_checkpoint_blocks)),
             "--fast_levers offload_checkpoints moves the inputs of checkpointed blocks to the host: it needs "
             "--gradient_checkpointing true and at least one --fast_checkpoint_blocks kind")
        need(not self.fsdp2 or backend.supports_fsdp2, f"--fsdp2: backend {shown(self.backend)} is not supported with "
             "FSDP2 (fast calls each block's mixers directly, bypassing FSDP2's per-block all-gather; Unsloth patches "
             "the model itself); use --backend hf, or DDP without --fsdp2")
        need(not self.fsdp2 or os.environ.get("WORLD_SIZE") is not None, "--fsdp2 needs a distributed launch: "
             "torchrun --nproc_per_node=N scripts/train_multigpu.py ...")
        need(not (self.fsdp2 and train is not None and train.resume_from_checkpoint), "--fsdp2 with "
             "--resume_from_checkpoint: FSDP2 checkpoints hold the adapter only (no optimizer state), so a run "
             "cannot resume from them; start a new run")
        need(self.fast_gpu_arch in ("auto", "sm80"), f"--fast_gpu_arch must be auto or sm80, got {shown(self.fast_gpu_arch)}")
        need(not (self.overwrite and train is not None and train.resume_from_checkpoint), "--overwrite true with "
             "--resume_from_checkpoint: one replaces the run, the other continues it; pass one of them")
        unknown = set(self.fast_checkpoint_blocks) - set(CHECKPOINT_BLOCKS)
        need(not unknown, f"--fast_checkpoint_blocks: unknown {sorted(unknown)}; choose from {CHECKPOINT_BLOCKS}")
        need_count(self.early_stopping_patience, "--early_stopping_patience", 0, 10**6)
        need_number(self.early_stopping_threshold, "--early_stopping_threshold", 0, 1)
        need_number(self.max_forgetting, "--max_forgetting", 0, 1, optional=True)
        if train is not None:
            check_best_model(self, train)


def _value(option: Any) -> Any:
    return getattr(option, "value", option)  # transformers' option enums, as their strings


BEST_METRICS = ("eval_accuracy", "eval_loss", "eval_general_accuracy")  # what a train run's evaluations report


def check_best_model(run: RunArguments, train: Any) -> None:
    """The best-checkpoint and early-stopping settings, checked together before step 1 (transformers would fail
    at the first evaluation, or with an assert at the start)."""
    metric = train.metric_for_best_model
    if metric is not None:
        name = metric if metric.startswith("eval_") else f"eval_{metric}"
        close = difflib.get_close_matches(name, BEST_METRICS, n=1)
        need(name in BEST_METRICS, f"--metric_for_best_model {shown(metric)}: a train run's evaluations report "
             f"{', '.join(BEST_METRICS)}" + (f" (did you mean {close[0]}?)" if close else ""))
        need(_value(train.eval_strategy) != "no", "--metric_for_best_model needs "
             "evaluations: set --eval_strategy steps (and --eval_steps)")
    need(not (train.load_best_model_at_end and run.fsdp2), "--load_best_model_at_end with --fsdp2: the sharded "
         "adapter cannot be loaded back into the run; use DDP")
    if run.early_stopping_patience:
        need(metric is not None, "--early_stopping_patience needs --metric_for_best_model (e.g. eval_accuracy) "
             "and --load_best_model_at_end true")
    if run.max_forgetting is not None:
        need(_value(train.eval_strategy) != "no", "--max_forgetting is checked at "
             "every evaluation: set --eval_strategy steps (and --eval_steps)")


def validate_sft(train: Any, run: RunArguments | None = None) -> None:
    """TRL's SFTConfig is not ours to extend: its checks live here, next to the sections it is used with."""
    need(train.max_steps > 0 or train.num_train_epochs > 0, "set --max_steps or --num_train_epochs")
    need_text(train.output_dir, "--output_dir")
    need(train.max_steps == -1 or 1 <= train.max_steps <= 10**8, f"--max_steps must be -1 (use --num_train_epochs) or "
         f"a whole number from 1 to 100,000,000, got {train.max_steps}")
    if train.max_steps <= 0:
        need_number(train.num_train_epochs, "--num_train_epochs", 0, 10**4, low_open=True)
    for name, high in (("per_device_train_batch_size", 65536), ("per_device_eval_batch_size", 65536),
                       ("gradient_accumulation_steps", 65536)):
        need_count(getattr(train, name), f"--{name}", 1, high)
    need_count(train.seed, "--seed", 0, 2**32 - 1)
    need_count(train.dataloader_num_workers, "--dataloader_num_workers", 0, 256)
    need_count(train.save_total_limit, "--save_total_limit", 1, 10**6, optional=True)
    for name in ("save_steps", "logging_steps"):
        need_number(getattr(train, name), f"--{name}", 0, 10**8, low_open=True)
    need_number(train.eval_steps, "--eval_steps", 0, 10**8, low_open=True, optional=True)
    need_number(train.warmup_steps, "--warmup_steps", 0, 10**8)
    need_number(train.learning_rate, "--learning_rate", 0, 1, low_open=True)
    need_number(train.weight_decay, "--weight_decay", 0, 1e3)
    need_number(train.max_grad_norm, "--max_grad_norm", 0, optional=True)
    for name, low, high in (("adam_beta1", 0, 1), ("adam_beta2", 0, 1), ("label_smoothing_factor", 0, 1)):
        need(isinstance(getattr(train, name), (int, float)) and low <= getattr(train, name) < high,
             f"--{name} must be in [{low}, {high}), got {shown(getattr(train, name))}")
    need_number(train.adam_epsilon, "--adam_epsilon", 0, 1, low_open=True)
    need_number(train.neftune_noise_alpha, "--neftune_noise_alpha", 0, 1e3, optional=True)
    need_number(train.router_aux_loss_coef, "--router_aux_loss_coef", 0, 1e3, optional=True)
    need_number(train.eval_delay, "--eval_delay", 0, 10**8)
    need_count(train.data_seed, "--data_seed", 0, 2**32 - 1, optional=True)
    need_count(train.eval_accumulation_steps, "--eval_accumulation_steps", 1, 10**6, optional=True)
    need_count(train.ddp_bucket_cap_mb, "--ddp_bucket_cap_mb", 1, 10**5, optional=True)
    need_count(train.ddp_timeout, "--ddp_timeout", 1, 10**7)
    need_count(train.local_rank, "--local_rank", -1, 65535)  # set by launchers; -1: not distributed
    need_count(train.dataset_num_proc, "--dataset_num_proc", 1, 1024, optional=True)
    need_count(train.pad_to_multiple_of, "--pad_to_multiple_of", 1, 4096, optional=True)
    need_count(train.max_length, "--max_length", 17, 10**7, optional=True)
    need(not getattr(train, "hub_token", None), "--hub_token: pass the Hugging Face token through HF_TOKEN or "
         "`hf auth login`, never as a flag or config key (it would be written into every checkpoint's "
         "training_args.bin)")
    need(train.per_device_train_batch_size > 0, "--per_device_train_batch_size must be positive")
    need(train.learning_rate > 0, f"--learning_rate must be positive, got {train.learning_rate}")
    need(train.max_length is None or train.max_length > 16, f"--max_length too small: {train.max_length}")
    if train.packing:
        need(run is not None and Backend.from_run(run).keeps_sequence_boundaries, "--packing: samples packed into "
             "one row would leak into each other through NemotronH's Mamba2 state and convolution (transformers' "
             "path has no sequence boundaries); leave it off (padding is per batch), or use --backend fast, which "
             "keeps the boundaries")


@dataclass
class EvalArguments:
    adapter: str | None = field(default=None, metadata={"help": "adapter dir; omit to evaluate the base model"})
    limit: int | None = field(default=None, metadata={"help": "score only the first N questions"})
    output_dir: str = field(default="outputs/eval", metadata={"help": "where predictions.jsonl and summary.json go"})
    compare_base: bool = field(default=False, metadata={"help": "with --adapter, also score the base model"})
    bootstrap_samples: int = field(default=1000, metadata={"help": "resamples for the 95% interval"})
    overwrite: bool = field(default=False, metadata={"help": "replace existing predictions/summary"})
    eval_batch_size: int = field(default=8, metadata={"help": "questions per forward pass"})

    def validate(self) -> None:
        need_text(self.output_dir, "--output_dir")
        need_text(self.adapter, "--adapter", optional=True)
        for name, low in (("limit", 1), ("eval_batch_size", 1), ("bootstrap_samples", 0)):
            value = getattr(self, name)  # a negative --limit would silently drop rows from the end
            need(value is None or value >= low, f"--{name} must be {'positive' if low else '>= 0'}, got {value}")
        need_count(self.limit, "--limit", optional=True)
        need_count(self.eval_batch_size, "--eval_batch_size", 1, 4096)
        need_count(self.bootstrap_samples, "--bootstrap_samples", 0, 10**6)
        need(not self.compare_base or bool(self.adapter),
             "--compare_base compares the base model with an adapter: pass --adapter DIR too")


@dataclass
class PrepareArguments:
    output_dir: str = field(default="outputs/prepared", metadata={"help": "where the Arrow splits go"})
    test_fraction: float = field(default=0.0, metadata={"help": "share of questions for a test split"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing prepared dataset"})
    deidentify: bool = field(default=False, metadata={"help": "replace e-mails, phones, record ids, DOBs, street "
                                                              "addresses and titled names with placeholders "
                                                              "(regex; README 'De-identification')"})

    def validate(self) -> None:
        need_text(self.output_dir, "--output_dir")
        need_number(self.test_fraction, "--test_fraction", 0, 0.9)


def _field_map(sections: Sequence[type]) -> dict[str, tuple[type, dataclasses.Field]]:
    fields = {}
    for section in sections:
        for f in dataclasses.fields(section):
            if f.init:
                fields[f.name] = (section, f)
    return fields


class _Parser:
    """HfArgumentParser whose errors raise ConfigError instead of printing usage and exiting."""

    def __init__(self, sections: Sequence[type], prog: str, where: str):
        from transformers import HfArgumentParser

        where_ = where

        class Parser(HfArgumentParser):
            def error(self, message: str):  # argparse calls this for every bad flag or value
                raise ConfigError(f"{where_}: {message}")

        self.parser = Parser(sections, prog=prog)


def _unused_arguments(sections: Sequence[type], where: str, message: str) -> ConfigError | None:
    """HfArgumentParser's "Some specified arguments are not used" as one line with a suggestion."""
    import ast

    prefix = "Some specified arguments are not used by the HfArgumentParser: "
    if not message.startswith(prefix):
        return None
    try:
        unused = [str(a) for a in ast.literal_eval(message[len(prefix):].strip())]
    except (ValueError, SyntaxError):
        return None
    options = [a for a in unused if a.startswith("-")]
    if not options:
        return ConfigError(f"{where}: unexpected value(s) {unused} (an option that takes one value was given "
                           "several?)")
    name = options[0].lstrip("-").split("=")[0]
    close = difflib.get_close_matches(name, list(_field_map(sections)), n=1)
    hint = f" (did you mean --{close[0]}?)" if close else ""
    return ConfigError(f"{where}: unknown option {options[0]}{hint}"
                       + (f"; also not used: {unused[1:]}" if len(unused) > 2 else ""))


def _parse(sections: Sequence[type], prog: str, where: str, argv: list[str]) -> tuple:
    try:
        return _Parser(sections, prog, where).parser.parse_args_into_dataclasses(argv)
    except (ValueError, TypeError, ArithmeticError) as err:  # the dataclasses' own __post_init__ checks (int(inf))
        if isinstance(err, ConfigError):
            raise
        if isinstance(err, ArithmeticError):  # int(inf) in a __post_init__: name the flag that holds it
            flags = [f"{a} {b}" for a, b in zip(argv, argv[1:]) if a.startswith("--") and _not_finite(b)]
            raise ConfigError(f"{where}: {', '.join(flags) or 'a value'}: must be a finite number ({err})") from None
        raise _unused_arguments(sections, where, str(err)) or ConfigError(f"{where}: {err}") from None
    except ImportError as err:  # an option that needs a package medlora does not install (--deepspeed)
        given = [a for a in argv if a.startswith("--")]
        raise ConfigError(f"{where}: an option needs a package that is not installed ({bounded(err, 200)}); "
                          f"options given: {bounded(' '.join(given), 200)}") from None
    except (KeyError, AttributeError, OSError, RuntimeError) as err:  # other __post_init__ checks of the libraries
        raise ConfigError(f"{where}: {type(err).__name__}: {bounded(err, 300)}") from None


def _not_finite(text: str) -> bool:
    import math

    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False


def _yaml_to_argv(config: dict[str, Any]) -> list[str]:
    argv = []
    for key, value in config.items():
        if value is None:
            continue
        if isinstance(value, bool):
            argv += [f"--{key}", "true" if value else "false"]
        elif isinstance(value, list):
            argv += [f"--{key}", *[str(v) for v in value]] if value else []
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def _annotation(section: type, f: dataclasses.Field) -> str:
    """The field's declared type as text (HfArgumentParser rewrites `Field.type` in place, so read the class)."""
    import inspect

    for klass in section.__mro__:
        annotations = inspect.get_annotations(klass)
        if f.name in annotations:
            return str(annotations[f.name])
    return str(f.type)


MAX_CONFIG_BYTES = 1_000_000


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice (PyYAML silently keeps the last one) and any alias (`*name`): a
    config never needs one, and a few nested aliases expand into gigabytes (the "billion laughs")."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise ConfigError(f"{mark.line + 1}: YAML aliases (*name) are not accepted in a medlora config; "
                              "write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:
                continue  # an unhashable key: SafeLoader reports it below
            if first != key_node.start_mark.line + 1:
                raise ConfigError(f"{key_node.start_mark.line + 1}: key '{key}' is given twice "
                                  f"(first on line {first}); keep one")
        return super().construct_mapping(node, deep)


def read_yaml_mapping(path: str) -> dict[str, Any]:
    """A config file's mapping, or ConfigError naming the file (missing, a directory, not UTF-8, not YAML, a
    duplicated key, not a mapping). No knowledge of the sections: that is `load_yaml`'s."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {path} is a directory, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist" if not p.exists() else
                          f"config file {path} is not a regular file")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is {p.stat().st_size:,} bytes; a medlora config is a few kB "
                          f"(limit {MAX_CONFIG_BYTES:,})")
    try:
        config = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a medlora config") from None
    except ConfigError as err:
        raise ConfigError(f"{path}:{err}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: must be a YAML mapping of option: value, got {type(config).__name__}")
    return config


def load_yaml(path: str, sections: Sequence[type], also_known: Sequence[type] = ()) -> dict[str, Any]:
    """The file's keys for `sections`; keys of `also_known` sections are accepted and dropped."""
    config = read_yaml_mapping(path)
    known = _field_map(sections)
    other = _field_map(also_known)
    for key in config:
        if key not in known and key not in other:
            close = difflib.get_close_matches(str(key), list(known) + list(other), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{path}: unknown key '{key}'{hint}")
        kind = _annotation(*(known.get(key) or other[key])).lower()
        value = config[key]
        for container, name in ((list, "list"), (dict, "dict")):
            if isinstance(value, container) and name not in kind:  # would turn into several flags / a JSON string
                raise ConfigError(f"{path}: key '{key}' takes a single value, got a {name} {shown(value)}")
    # A key is used only by the section that owns it in training configs: `output_dir` in a training
    # file is the run's directory, not `medlora eval`'s output directory.
    return {k: v for k, v in config.items() if k in known and (k not in other or other[k][0] is known[k][0])}


def parse_config(argv: Sequence[str] | None, sections: Sequence[type], prog: str = "medlora",
                 also_known: Sequence[type] = ()) -> tuple:
    """Parse `--config FILE` and flags into one instance per section (flags override the file).

    `also_known`: sections whose keys may appear in the file but are not used by this command
    (so `medlora eval --config configs/tiny.yaml` reads the training config's model and data keys).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = None
    argv = [part for a in argv for part in (a.split("=", 1) if a.startswith("--config=") else [a])]
    given = [i for i, a in enumerate(argv) if a == "--config"]
    if len(given) > 1:
        files = [argv[i + 1] if i + 1 < len(argv) else "?" for i in given]
        raise ConfigError(f"--config is given {len(given)} times ({', '.join(files)}); pass one file (flags after "
                          "it override its values)")
    if given:
        i = given[0]
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            raise ConfigError("--config needs a file path")
        config_path = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    file_argv = _yaml_to_argv(load_yaml(config_path, sections, also_known)) if config_path else []
    given = {a[2:].split("=")[0] for a in file_argv + argv if a.startswith("--")}
    extra = _device_defaults(sections, given)
    # Check the file's values alone first, so a wrong type is reported against the file.
    if file_argv:
        _parse(sections, prog, config_path, extra + file_argv)
    parsed = _parse(sections, prog, "command line", extra + file_argv + argv)
    return tuple(parsed)


def training_sections() -> tuple:
    from trl import SFTConfig

    return (ModelArguments, LoraArguments, DataArguments, RunArguments, SFTConfig)


def _device_defaults(sections: Sequence[type], given: set[str]) -> list[str]:
    """bf16 and 8-bit AdamW where the hardware supports them, unless the user chose."""
    from trl import SFTConfig

    if SFTConfig not in sections:
        return []
    import torch

    cuda = torch.cuda.is_available()
    argv = []
    if "bf16" not in given:
        argv += ["--bf16", "true" if cuda and torch.cuda.is_bf16_supported() else "false"]
    if "optim" not in given:
        argv += ["--optim", "adamw_bnb_8bit" if cuda else "adamw_torch"]
    if "use_cpu" not in given and not cuda:
        argv += ["--use_cpu", "true"]
    return argv


def validate(model: ModelArguments | None = None, lora: LoraArguments | None = None,
             data: DataArguments | None = None, run: RunArguments | None = None, train: Any = None) -> None:
    """Every given section's own validator (each message names the option), then the SFTConfig checks."""
    for section in (model, lora, data):
        if section is not None:
            section.validate()
    if run is not None:
        run.validate(train)
    if train is not None:
        validate_sft(train, run)
    if run is not None and model is not None and model.load_in_4bit:
        need(Backend.from_run(run).is_fast, f"--load_in_4bit with --backend {shown(run.backend)}: bitsandbytes would "
             "quantise only the nn.Linear layers (~1.5 B of Nemotron-3-Nano's 31.6 B parameters; the fused 3-D routed "
             "experts stay bf16, so a 40 GB GPU still cannot hold the model, and PEFT's k-bit preparation would cast "
             "them to fp32); medlora's 4-bit experts run with --backend fast")
    if run is not None and data is not None:
        need(run.max_forgetting is None or bool(data.general_eval_data), "--max_forgetting needs "
             "--general_eval_data (the general questions it watches; offline: data/sample/general_mcq_sample.jsonl)")


def to_dict(*sections: Any) -> dict[str, Any]:
    """A JSON-safe dict of the resolved configuration (secrets masked by TrainingArguments.to_dict)."""
    out: dict[str, Any] = {}
    for obj in sections:
        if obj is None:
            continue
        data = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
        out[type(obj).__name__] = json.loads(json.dumps(data, default=str))
    return out
