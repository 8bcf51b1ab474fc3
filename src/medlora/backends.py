"""Training backends besides the plain Hugging Face stack (`hf`, in `medlora.model`).

`unsloth`: Unsloth's `FastLanguageModel.from_pretrained` + its `get_peft_model` with the same LoRA
settings; the same pre-tokenised data and the same SFTTrainer configuration follow in
`medlora.train`. Unsloth imports only with an NVIDIA GPU, so without one the backend stops with one
sentence. Unsloth must be imported before transformers/TRL/PEFT to patch them: the CLI and
`scripts/train_unsloth.py` call `import_unsloth_first()` before anything else.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Any

from medlora.config import LoraArguments, ModelArguments
from medlora.backend import Backend
from medlora.errors import ConfigError, MedloraError

def require_unsloth() -> None:
    import torch

    if not torch.cuda.is_available():
        raise MedloraError("--backend unsloth needs an NVIDIA GPU (Unsloth imports only with CUDA); "
                           "use --backend hf on this machine")
    try:
        import unsloth  # noqa: F401
    except ImportError as err:
        raise MedloraError(f"--backend unsloth: Unsloth is not installed ({err}); run `uv sync --extra unsloth`") \
            from None


def requested_backend(argv: list[str]) -> str | None:
    """The `--backend` a command line asks for, before transformers is imported: the last flag, else the key in
    the `--config` file (read with the same duplicate-refusing YAML loader as `parse_config`)."""
    flags = [i for i, a in enumerate(argv) if a == "--backend" and i + 1 < len(argv)]
    if flags:  # the last flag wins, as in parse_config
        return argv[flags[-1] + 1]
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        from medlora.config import read_yaml_mapping

        try:
            config = read_yaml_mapping(argv[argv.index("--config") + 1])
        except ConfigError:
            return None  # parse_config reports the bad file
        value = config.get("backend")
        return value if isinstance(value, str) else None
    return None


def import_unsloth_first(argv: list[str]) -> None:
    """Import Unsloth before transformers when the command asks for it (flag or YAML key)."""
    requested = requested_backend(argv)
    try:
        unsloth = requested is not None and Backend.parse(requested, "--backend").is_unsloth
    except ConfigError:
        return  # parse_config reports the bad value
    if unsloth:
        require_unsloth()


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


def load_unsloth(model_args: ModelArguments, lora_args: LoraArguments, max_length: int,
                 gradient_checkpointing: bool, seed: int) -> tuple[Any, Any, dict[str, Any]]:
    """(peft model, tokenizer, report of what Unsloth changed) through Unsloth's own loaders."""
    require_unsloth()
    from unsloth import FastLanguageModel

    from medlora.model import resolve_dtype, resolve_model_path

    path = resolve_model_path(model_args)
    if Path(path).is_dir():
        path = str(Path(path).resolve())  # a relative local path makes Unsloth probe the hub for it
    captured = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, captured)), contextlib.redirect_stderr(_Tee(sys.stderr, captured)):
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=path, max_seq_length=max_length, dtype=resolve_dtype(model_args.torch_dtype),
            load_in_4bit=model_args.load_in_4bit, full_finetuning=False, trust_remote_code=False,
        )
        from medlora.model import check_lora_targets

        check_lora_targets(model, lora_args)
        model = FastLanguageModel.get_peft_model(
            model, r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
            target_modules=list(lora_args.lora_target_modules),
            target_parameters=list(lora_args.lora_target_parameters) or None,
            bias="none", use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
            random_state=seed, use_rslora=lora_args.use_rslora,
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, unsloth_report(model, captured.getvalue())


def unsloth_report(model, log: str) -> dict[str, Any]:
    """What Unsloth changed for this model: its own log lines and which forwards it replaced."""
    patched = set()
    for name, module in model.named_modules():
        forward = getattr(type(module), "forward", None)
        origin = getattr(forward, "__module__", "") or ""
        if "unsloth" in origin.lower() or "compiled" in type(module).__name__.lower():
            patched.add(f"{type(module).__name__} ({origin})")
    lines = [ln.strip() for ln in log.splitlines() if "unsloth" in ln.lower() or "patch" in ln.lower()
             or "fall" in ln.lower() or "compil" in ln.lower() or "lora" in ln.lower()]
    return {"log": lines[:60], "patched_module_classes": sorted(patched)[:40]}


def set_sdpa_cudnn(backend: Backend, setting: bool | None) -> bool:
    """Turn SDPA's cuDNN backend on or off for this process (torch's switch is process-wide) and return what holds.

    None: off for hf and hf+triton, torch's default for the rest. On one H200 (2026-12-03, README) cuDNN attention
    built a plan for each new sequence length (0.1-1.3 s), and hf+triton on nano-full ran 952 tokens/s with cuDNN
    (slowest step 3.6x the median) against 1,707 without it (1.03x). Unsloth gains little (288 tokens/s off on
    2026-12-04 against 280 with torch's default on 2026-12-02), so it keeps torch's default; fast makes no SDPA
    call (varlen attention). Off, SDPA takes flash / mem-efficient / math,
    as it does on an A100 anyway: torch ranks cuDNN first only on sm90 and sm100.
    """
    import torch

    if setting is None and backend.name == "hf":
        setting = False
    if setting is not None:
        torch.backends.cuda.enable_cudnn_sdp(setting)
    return torch.backends.cuda.cudnn_sdp_enabled()


def load_for_training(backend: Backend, model_args: ModelArguments, lora_args: LoraArguments, *, max_length: int,
                      gradient_checkpointing: bool | tuple[str, ...], seed: int, device=None,
                      trust_remote_code: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """(LoRA-wrapped model, tokenizer, backend report): the one loading path of `train` and `bench`.

    `fast` loads exactly what `hf` loads (same weights, same PEFT adapters) and then switches the backbone's
    forward to `medlora.fast`; with it (and with Unsloth) activation checkpointing is the backend's own, so the
    Trainer's must stay off (`trainer.build_sft_config` does that). For fast, `gradient_checkpointing` may name
    block kinds (selective checkpointing).
    """
    if backend.is_unsloth:
        return load_unsloth(model_args, lora_args, max_length, bool(gradient_checkpointing), seed)
    from medlora.model import load_model

    model, tokenizer = load_model(model_args, device=device, trust_remote_code=trust_remote_code)
    model, report = wrap_for_training(backend, model, lora_args, gradient_checkpointing)
    return model, tokenizer, report


def wrap_for_training(backend: Backend, model, lora_args: LoraArguments,
                      gradient_checkpointing: bool | tuple[str, ...]) -> tuple[Any, dict[str, Any]]:
    """(PEFT model, backend report) for a loaded transformers model: `hf` and `fast` (Unsloth wraps its own)."""
    from medlora.model import apply_lora

    quantization = getattr(model, "_medlora_quantization", None)
    model = apply_lora(model, lora_args)
    report: dict[str, Any] = {}
    if quantization:  # --load_in_4bit: the experts' own forward must never read their placeholders
        from medlora.fast import route_quantized_experts
        from medlora.quant import weights_by_dtype

        route_quantized_experts(model)
        report["quantization"] = {**quantization, "parameters_by_dtype": weights_by_dtype(model)}
    if backend.triton_mamba_ops:
        from medlora.fast import patch_hf_mamba_ops

        report = patch_hf_mamba_ops()
    if not backend.is_fast:
        return model, report
    from medlora import fast

    return model, {**fast.enable(model, backend.levers, gradient_checkpointing, backend.gpu_arch), **report}
