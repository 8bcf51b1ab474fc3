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
            fingerprint = getattr(self.trainer, "fingerprint", None)
            if fingerprint is not None:  # part of the committed files: a resume checks it against its settings
                (checkpoint / FINGERPRINT).write_text(json.dumps(fingerprint, indent=1, default=str))
            commit_checkpoint(checkpoint)
            # only now may older checkpoints go: a kill in between still leaves a complete one
            limit = getattr(self.trainer, "save_total_limit", args.save_total_limit)
            rotate_checkpoints(Path(args.output_dir), limit, keep=(checkpoint,
                               state.best_model_checkpoint))
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
        if self.signum is not None:  # second signal: stop now, without saving, with this signal's own status
            import sys

            print(f"medlora: stopped: a second signal ({signal.Signals(signum).name}): aborted without saving; the "
                  "last committed checkpoint is intact (continue with --resume_from_checkpoint auto)",
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(128 + signum)  # now: unwinding through the Trainer mid-step would only print tracebacks
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


def rotate_checkpoints(output_dir: Path, limit: int | None, keep=()) -> list[str]:
    """Keep the newest `limit` committed checkpoints (and those in `keep`: the one just saved, the best); remove
    older committed ones, and torn ones older than the newest committed (they can never be resumed). The
    Trainer's own rotation is off: it deleted before the new checkpoint was committed."""
    import shutil

    if not limit:
        return []
    found = sorted(((int(p.name.split("-", 1)[1]), p) for p in Path(output_dir).glob("checkpoint-*")
                    if p.is_dir() and p.name.split("-", 1)[1].isdigit()), reverse=True)
    committed = [(step, p) for step, p in found if (p / MARKER).is_file()]  # the marker: cheap, no re-hashing
    if not committed:
        return []
    keep_paths = {Path(k).resolve() for k in keep if k} | {p.resolve() for _, p in committed[:limit]}
    newest = committed[0][0]
    removed = []
    for step, path in found:
        if path.resolve() in keep_paths:
            continue
        if (path / MARKER).is_file() or step < newest:  # older committed beyond the limit, or torn and superseded
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


# ---------------------------------------------------------------- resuming only the same run

FINGERPRINT = "medlora_fingerprint.json"
# settings a resumed run may change (said as a warning); any other difference is refused, naming the keys
RESUMABLE = {"max_steps", "num_train_epochs", "save_steps", "save_total_limit", "save_strategy", "eval_steps",
             "eval_strategy", "logging_steps", "eval_accuracy_samples", "eval_batch_size", "per_device_eval_batch_size",
             "dataloader_num_workers", "report_to", "disable_tqdm", "fast_levers", "fast_gpu_arch",
             "fast_checkpoint_blocks", "tiny_cache_dir", "skip_invalid"}
_SFT_KEYS = ("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "weight_decay",
             "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim", "optim_args",
             "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "packing", "seed", "data_seed",
             "bf16", "fp16", "gradient_checkpointing", "neftune_noise_alpha", "label_smoothing_factor",
             "group_by_length", "max_steps", "num_train_epochs", "save_steps", "save_total_limit", "save_strategy",
             "eval_steps", "eval_strategy", "logging_steps", "per_device_eval_batch_size", "dataloader_num_workers",
             "report_to", "disable_tqdm")
_OWN_IGNORED = {"overwrite", "audit"}  # how a run is started, not what it trains


def run_fingerprint(sections, train_args, rows: dict[str, list], world_size: int) -> dict[str, Any]:
    """What makes a checkpoint this run's: every setting that shapes training, and a hash of the data."""
    import dataclasses

    settings: dict[str, Any] = {}
    for section in sections:
        for f in dataclasses.fields(section):
            if f.name not in _OWN_IGNORED:
                settings[f.name] = getattr(section, f.name)
    for key in _SFT_KEYS:
        value = getattr(train_args, key, None)
        settings[key] = getattr(value, "value", value)  # enums as their names
    settings["world_size"] = world_size
    digest = hashlib.sha256()
    for name in sorted(rows):
        for row in rows[name]:
            digest.update(json.dumps([name, row.get("id"), row.get("question"), *(row.get(k) for k in
                                      ("opa", "opb", "opc", "opd", "cop", "exp", "subject_name"))],
                                     sort_keys=True, default=str, ensure_ascii=True).encode())
    return {"settings": json.loads(json.dumps(settings, default=str)), "data_sha256": digest.hexdigest()}


def check_resume_fingerprint(checkpoint: str, current: dict[str, Any], say=print) -> None:
    """Refuse to continue a checkpoint under other settings or data (naming what differs); warn for the few
    settings that may change (RESUMABLE); say so when the checkpoint predates fingerprints."""
    from medlora.errors import ConfigError, bounded

    path = Path(checkpoint) / FINGERPRINT
    if not path.is_file():
        say(f"medlora: warning: {Path(checkpoint).name} has no {FINGERPRINT} (saved by an older medlora): its "
            "settings and data cannot be compared with this run's")
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        old, new = dict(saved.get("settings", {})), current["settings"]
    except (ValueError, OSError, AttributeError, TypeError):
        raise ConfigError(f"--resume_from_checkpoint: {path} cannot be read as a run fingerprint; the checkpoint is "
                          "damaged: name an older one, or start a new run") from None
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    refused = [k for k in differ if k not in RESUMABLE]
    changes = ", ".join(f"{k} {bounded(repr(old.get(k)), 60)} -> {bounded(repr(new.get(k)), 60)}" for k in refused[:8])
    if saved.get("data_sha256") != current["data_sha256"]:
        changes = ("the training/eval data (its rows differ)" + (", " if changes else "")) + changes
    if changes:
        raise ConfigError(f"--resume_from_checkpoint: {Path(checkpoint).name} belongs to a run with other settings: "
                          f"{changes}. Resume with that run's settings, or start a new run (--overwrite true, or "
                          "another --output_dir)")
    allowed = [k for k in differ if k in RESUMABLE]
    if allowed:
        say("medlora: resuming with changed " + ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in allowed))


# ---------------------------------------------------------------- the run directory


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
        finished = [m for m in ("metrics.json", "adapter") if (output_dir / m).exists()]
        if finished:
            raise ConfigError(f"--resume_from_checkpoint auto: {output_dir} holds a finished run ({', '.join(finished)}) "
                              "and no complete checkpoint to continue from; pass --overwrite true to train it again, "
                              "or choose another --output_dir")
        print(f"medlora: no checkpoint in {output_dir}; starting from step 0")
    return last


OOM_ADVICE = ("out of GPU memory ({detail}). Turn one of these knobs: --per_device_train_batch_size (lower it, and "
              "raise --gradient_accumulation_steps to keep the effective batch), --max_length (longer examples are "
              "left out and counted), --gradient_checkpointing true, --load_in_4bit true with --backend fast "
              "(routed experts and linear layers in NF4; nano-full trained in 30.6 GiB at batch 128), or --backend fast "
              "(padding-free Triton path, far less activation memory); `medlora bench` measures peak memory per "
              "setting.")


def oom_error(err: BaseException) -> MedloraError:
    detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return MedloraError(OOM_ADVICE.format(detail=detail))
