"""Facts recorded with every run: library versions, hardware, distributed rank."""

from __future__ import annotations

import json
import os
import time
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

PACKAGES = ("medlora", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes",
            "unsloth", "unsloth_zoo", "triton", "tokenizers", "fla-core", "mamba_ssm", "cut-cross-entropy",
            "liger-kernel")


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    import torch

    out["cuda"] = torch.version.cuda
    try:  # version() checks the cuDNN build against the GPUs: a mismatch is recorded, not raised into the run
        out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except RuntimeError as err:
        out["cudnn"] = f"unusable: {str(err)[:160]}"
    if out["mamba_ssm"] is None:  # backend fast's Triton ops come from medlora's kernel cache, not a package
        from medlora.kernels import MAMBA_SSM_VERSION, cached_mamba_ssm

        if cached_mamba_ssm()[0] is not None:
            out["mamba_ssm"] = f"{MAMBA_SSM_VERSION} (Triton ops, medlora kernel cache)"
    out["git_commit"] = _git_commit()
    out["git_dirty"] = _git_dirty()
    return out


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        info["gpu"] = None
    return info


def _git(*args: str) -> str | None:
    """stdout of a git command in the checkout medlora runs from; None outside a git checkout."""
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_dirty() -> bool | None:
    """True when tracked files differ from the commit: the numbers then belong to uncommitted code."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def _git_commit() -> str | None:
    return _git("rev-parse", "--short", "HEAD") or None


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


# ---------------------------------------------------------------- result files


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """One JSON object per line, written beside and renamed into place (never a half-written file)."""
    _replace_with(path, lambda fh: [fh.write(json.dumps(r, ensure_ascii=False) + "\n") for r in records])


def write_json(path: Path, obj: Any) -> None:
    _replace_with(path, lambda fh: fh.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n"))


def _replace_with(path: Path, write) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            write(fh)
        tmp.replace(path)
    finally:  # a full disk leaves neither a partial file nor the temporary one
        if tmp.exists():
            tmp.unlink()


def new_result_path(results_dir: str | Path, day: str, gpu: str | None, name: str) -> Path:
    """RESULTS_DIR/<date>-<gpu>-<name>.json, with the time appended if that file exists (never overwritten)."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{day}-{(gpu or 'cpu').replace('NVIDIA ', '').replace(' ', '-').lower()}-{name}"
    path = results_dir / f"{stem}.json"
    return results_dir / f"{stem}{time.strftime('-%H%M%S')}.json" if path.exists() else path
