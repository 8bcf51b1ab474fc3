"""Wall time of every phase of a run, as it happens: OUTPUT_DIR/medlora_phases.jsonl (one JSON object a line).

A run that is stopped (SIGTERM) and resumed writes to the same file from both processes, so the rehearsal
(`medlora rehearse`) and a user can read load, first step, every step, each eval, each save and the resume
from one place; metrics.json keeps the summary of the process that finished.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

PHASES_FILE = "medlora_phases.jsonl"


def process_start() -> float:
    """When this process started (epoch seconds): the resume clock starts before Python imports anything."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil comes with accelerate; without it the clock starts at import
        return _IMPORTED


_IMPORTED = time.time()


class PhaseLog:
    """Appends phase records for one process; a no-op on non-main ranks (`enabled=False`)."""

    def __init__(self, output_dir: Path, enabled: bool = True):
        self.path = Path(output_dir) / PHASES_FILE
        self.enabled = enabled
        self.started = process_start()
        self.records: list[dict[str, Any]] = []
        self.pid = os.getpid()
        self.peak_gib = 0.0  # the whole process's peak (per-event peaks reset the CUDA counter)

    def event(self, phase: str, seconds: float | None = None, **fields: Any) -> dict[str, Any]:
        import torch

        record = {"phase": phase, "pid": self.pid, "t": round(time.time() - self.started, 3),
                  **({"seconds": round(seconds, 3)} if seconds is not None else {}), **fields}
        if torch.cuda.is_available():  # GPU memory peak since the previous event: which phase needs the most
            record["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            self.peak_gib = max(self.peak_gib, record["peak_gib"])
            torch.cuda.reset_peak_memory_stats()
        self.records.append(record)
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        return record

    def timed(self, phase: str, **fields: Any):
        log = self

        class _Timer:
            def __enter__(self):
                self.t0 = time.time()
                return self

            def __exit__(self, *exc):
                if exc[0] is None:
                    log.event(phase, time.time() - self.t0, **fields)

        return _Timer()

    def summary(self) -> dict[str, Any]:
        steps = [r["seconds"] for r in self.records if r["phase"] == "step"]
        out: dict[str, Any] = {}
        for r in self.records:
            if r["phase"] not in ("step", "eval", "save", "first_step"):
                extra = {k: v for k, v in r.items() if k not in ("phase", "pid", "t", "seconds")}
                out[r["phase"]] = {"seconds": r.get("seconds"), **extra} if extra else r.get("seconds")
        first = next((r for r in self.records if r["phase"] == "first_step"), None)
        if first:
            out["first_step"] = {"step": first["step"], "seconds": first["seconds"],
                                 "since_process_start_s": first["t"]}
        if steps:
            timed = steps[1:] or steps  # the first step carries compilation and allocation
            step_records = [r for r in self.records if r["phase"] == "step"]
            out["steps"] = {"n": len(steps), "mean_s": round(statistics.fmean(timed), 3),
                            "median_s": round(statistics.median(timed), 3), "max_s": round(max(timed), 3),
                            "slowest_step": next(r["step"] for r in step_records if r["seconds"] == max(timed))}
            tokens = [r.get("tokens") for r in step_records[1:] or step_records]
            if all(t is not None for t in tokens):  # real (non-padding) tokens the steps trained on
                out["steps"]["tokens_per_s"] = round(sum(tokens) / sum(timed), 1)
            peaks = [r["peak_gib"] for r in step_records if "peak_gib" in r]
            if peaks:
                out["steps"]["peak_gib"] = max(peaks)
        if self.peak_gib:
            out["peak_gib"] = self.peak_gib
        out["evals"] = [{k: v for k, v in r.items() if k not in ("phase", "pid")}
                        for r in self.records if r["phase"] == "eval"]
        out["saves"] = [{k: v for k, v in r.items() if k not in ("phase", "pid")}
                        for r in self.records if r["phase"] == "save"]
        return out


def read_phases(output_dir: Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / PHASES_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class StepClock(_callback_base()):
    """Every optimizer step's wall time (CUDA-synchronised) and real tokens, and the first step of this process.

    The trainer it is bound to counts the step's real tokens in `step_tokens` (summed on the device)."""

    def __init__(self):
        self.trainer = None
        self.t0 = None
        self.first = True

    def bind(self, trainer) -> None:
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        self.t0 = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if self.t0 is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.time() - self.t0
        count, self.trainer.step_tokens = self.trainer.step_tokens, None
        extra = {} if count is None else {"tokens": int(count)}
        log = self.trainer.phases
        if self.first:
            log.event("first_step", seconds, step=state.global_step, **extra)
            self.first = False
        log.event("step", seconds, step=state.global_step, **extra)
