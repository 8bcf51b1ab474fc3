"""Run safety: one run per output dir, committed checkpoints, clean stops on signals, non-finite stops, OOM advice.

* `RunLock`: an exclusive `flock` on OUTPUT_DIR/.medlora.lock, taken by the main process. The kernel
  drops it when the process dies, `kill -9` included, so a killed run never leaves it stuck; the
  file records who holds it, for the message a second run gets.
* Checkpoints: the Trainer writes `checkpoint-N/` in place; when it has finished, `CheckpointCommit`
  writes `medlora_complete.json` (every file with its size and SHA-256) under a temporary name and
  renames it. A checkpoint without that marker, or whose files no longer match it, is torn:
  `--resume_from_checkpoint auto` skips it with a message and an explicit path to it is refused.
* `SignalStop`: SIGTERM / SIGINT (nohup, schedulers, Ctrl-C) ask the Trainer to save a checkpoint at
  the end of the current step and stop; `train` then exits with 128 + signal number. A second signal
  aborts at once.
* `NonFiniteStop`: before every optimizer step the (DDP-reduced) LoRA gradients are checked; NaN or
  inf stops the run naming the step and the loss, before the optimizer could write NaN into the
  weights, so the last committed checkpoint is intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import torch

from medlora.errors import Interrupted, MedloraError  # noqa: F401 - re-exported

LOCK_NAME = ".medlora.lock"
MARKER = "medlora_complete.json"


# ---------------------------------------------------------------- one run per output dir


class RunLock:
    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.handle = None

    def acquire(self) -> "RunLock":
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+", encoding="utf-8")
        except OSError as err:
            raise MedloraError(f"--output_dir {self.path.parent}: cannot write there ({err.strerror})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise MedloraError(f"{self.path.parent} is in use by a running medlora run ({holder}); wait for it, "
                               "stop it, or choose another --output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            import fcntl

            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


# ---------------------------------------------------------------- committed checkpoints


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def commit_checkpoint(checkpoint: Path) -> None:
    files = {str(p.relative_to(checkpoint)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name != MARKER}
    tmp = checkpoint / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"files": files, "committed": time.time()}, indent=1))
    os.replace(tmp, checkpoint / MARKER)  # atomic: the checkpoint is valid from this instant


def checkpoint_problem(checkpoint: Path) -> str | None:
    """None when the checkpoint is complete; otherwise why it is torn."""
    marker = checkpoint / MARKER
    if not marker.is_file():
        return f"no {MARKER} (the run stopped while writing it)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"{MARKER} unreadable ({err})"
    for name, meta in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["bytes"] or _sha256(path) != meta["sha256"]:
            return f"{name} differs from what was written"
    return None


def last_good_checkpoint(output_dir: Path, say=print) -> str | None:
    """The newest committed checkpoint-N in output_dir; torn ones are reported and skipped."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        say(f"medlora: skipping torn checkpoint {path}: {problem}")
    return None


class _Bound:
    """A callback that needs the trainer it serves (`MedloraSFTTrainer` calls `bind` once it exists)."""

    trainer: Any = None

    def bind(self, trainer) -> None:
        self.trainer = trainer


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class CheckpointCommit(_Bound, _callback_base()):
    """Commits each checkpoint the Trainer has finished writing (the marker above) and times the save."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            commit_checkpoint(checkpoint)
            started = getattr(self.trainer, "save_started", None)
            if started is not None:
                size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
                self.trainer.phases.event("save", time.time() - started, step=state.global_step, bytes=size)
                self.trainer.save_started = None
        return control


class SignalStop(_callback_base()):
    """SIGTERM / SIGINT: save a checkpoint at the end of the current step and stop; a second signal aborts."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. not in some notebook runners)
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop now, without saving
            self.uninstall()
            raise KeyboardInterrupt
        self.signum = signum
        print(f"medlora: {signal.Signals(signum).name} received: saving a checkpoint after this step, then "
              "stopping (send it again to abort without saving)", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        signum = self.signum or 0
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # every rank must stop at the same step
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
            flag = torch.tensor([signum], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
            if signum and self.signum is None:
                self.signum = signum  # another rank got it first
        if signum:
            control.should_save = True
            control.should_training_stop = True
        return control


class NonFiniteStop(_Bound, _callback_base()):
    """Before every optimizer step: NaN/inf in a (DDP-reduced) gradient stops the run before a weight changes."""

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        model = self.trainer.model
        grads = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
        if not grads:
            return control
        finite = torch.stack([torch.isfinite(g).all() for _, g in grads])
        if bool(finite.all()):
            return control
        name = next(n for (n, _), ok in zip(grads, finite.tolist()) if not ok)
        loss = getattr(self.trainer, "last_loss", None)
        loss = None if loss is None else float(loss)
        good = last_good_checkpoint(Path(args.output_dir), say=lambda _: None)
        raise MedloraError(
            f"step {state.global_step + 1}: non-finite gradients (NaN/inf), first in {name}; loss "
            f"{loss if loss is None else f'{loss:.6g}'}. Stopped before the optimizer step, so no weight was "
            f"changed; last good checkpoint: {good or 'none'}. Lower --learning_rate, check the data, or use "
            "--bf16/--max_grad_norm")


# ---------------------------------------------------------------- the run directory


RUN_MARKERS = ("metrics.json", "adapter", "trainer_state.json")


def check_output_dir(output_dir: Path, overwrite: bool, resume: str | None) -> None:
    if not output_dir.exists() or overwrite or resume:
        return
    found = [m for m in RUN_MARKERS if (output_dir / m).exists()] + [p.name for p in output_dir.glob("checkpoint-*")]
    if found:
        raise MedloraError(
            f"{output_dir} already holds a run ({', '.join(sorted(found)[:3])}); pass --overwrite to replace it, "
            "--resume_from_checkpoint auto to continue it, or choose another --output_dir"
        )


def resolve_resume(output_dir: Path, resume: str | None) -> str | None:
    """The checkpoint to resume from: a committed one only; torn ones are skipped."""
    from medlora.errors import ConfigError

    if not resume:
        return None
    if resume != "auto":
        if not Path(resume).is_dir():
            raise ConfigError(f"--resume_from_checkpoint: {resume} is not a checkpoint directory")
        problem = checkpoint_problem(Path(resume))
        if problem:
            raise ConfigError(f"--resume_from_checkpoint: {resume} is torn or incomplete ({problem}); "
                              "use --resume_from_checkpoint auto to take the newest complete one")
        return resume
    last = last_good_checkpoint(output_dir) if output_dir.is_dir() else None
    if last is None:
        print(f"medlora: no checkpoint in {output_dir}; starting from step 0")
    return last


OOM_ADVICE = ("out of GPU memory ({detail}). Turn one of these knobs: --per_device_train_batch_size (lower it, and "
              "raise --gradient_accumulation_steps to keep the effective batch), --max_length (longer examples are "
              "left out and counted), --gradient_checkpointing true, --load_in_4bit true (QLoRA), or --backend fast "
              "(padding-free Triton path, far less activation memory); `medlora bench` measures peak memory per "
              "setting.")


def oom_error(err: BaseException) -> MedloraError:
    detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return MedloraError(OOM_ADVICE.format(detail=detail))
