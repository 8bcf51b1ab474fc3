"""`medlora rehearse`: the real recipe end to end at full size, every phase timed, one JSON of the lot.

    uv run medlora rehearse --train_config configs/nano-fast.yaml --model_name_or_path random:nano-full

The same `medlora train` a user runs (their config, unchanged but for the model and the data), in separate
processes as a user would see them: train until step K -> SIGTERM (a checkpoint is saved, exit 143) ->
`--resume_from_checkpoint auto` to the end (adapter, metrics.json, MODEL_CARD.md) -> `medlora eval` of the
adapter -> `medlora export` of the merged model. The data is a seeded split of the MedMCQA dev file (train =
the rest, eval = `eval_questions`), written to the work dir, never into the repository. Phase times come from
each run's OUTPUT_DIR/medlora_phases.jsonl (`medlora.phases`); sizes from the files written.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from medlora.errors import MedloraError

TARGETS = {"checkpoint_save_s": 30.0, "resume_to_first_new_step_s": 180.0, "accuracy_eval_500_s": 60.0}


@dataclass
class RehearsalArguments:
    train_config: str = field(default="configs/nano-fast.yaml", metadata={"help": "the training config a user runs"})
    model_name_or_path: str = field(default="random:nano-full", metadata={
        "help": "the model swapped in: random:nano-full (real widths, random weights, built on the GPU), a local dir"})
    data_path: str = field(default="../shared/data/medmcqa/dev.jsonl", metadata={
        "help": "MedMCQA-format file split into train / eval for the rehearsal"})
    eval_questions: int = field(default=500, metadata={"help": "questions held out (eval loss and accuracy)"})
    max_steps: int = field(default=60, metadata={"help": "optimizer steps in all"})
    eval_steps: int = field(default=25, metadata={"help": "evaluate (loss + accuracy) every N steps"})
    save_steps: int = field(default=25, metadata={"help": "checkpoint every N steps"})
    sigterm_at_step: int = field(default=35, metadata={"help": "send SIGTERM once this step is done"})
    work_dir: str = field(default="outputs/rehearsal", metadata={"help": "split files, the run, logs (must be new)"})
    export_dir: str = field(default="outputs/rehearsal-merged", metadata={
        "help": "where the merged model goes (63 GB for nano-full: /dev/shm/... on a small disk)"})
    train_flags: str = field(default="", metadata={
        "help": "extra `medlora train` flags as one quoted string, e.g. \"--per_device_train_batch_size 32\""})
    results_dir: str = field(default="benchmarks/results/rehearsal", metadata={
        "help": "where the rehearsal JSON goes (apart from the bench results, which have another shape)"})
    tag: str = field(default="", metadata={"help": "suffix for the result file name"})

    def validate(self) -> None:
        from medlora.config import need, need_count, need_file_tag, need_text

        need_file_tag(self.tag)

        for name in ("train_config", "model_name_or_path", "data_path", "work_dir", "export_dir", "results_dir"):
            need_text(getattr(self, name), f"--{name}")
        need_count(self.eval_questions, "--eval_questions", 1, 10**6)
        need_count(self.max_steps, "--max_steps", 2, 10**6)
        need_count(self.eval_steps, "--eval_steps", 1, 10**6)
        need_count(self.save_steps, "--save_steps", 1, 10**6)
        need(0 < self.sigterm_at_step < self.max_steps, "--sigterm_at_step must be between 0 and --max_steps")


def _write_split(args: RehearsalArguments, work: Path) -> dict[str, Any]:
    from medlora.data import load_medmcqa, split_rows

    rows, report = load_medmcqa(args.data_path, skip_invalid=True)  # rows a training load rejects: counted, left out
    if len(rows) <= args.eval_questions:
        raise MedloraError(f"--data_path {args.data_path}: {len(rows)} usable questions, need more than "
                           f"--eval_questions {args.eval_questions}")
    parts = split_rows(rows, min(0.5, (args.eval_questions + 20) / len(rows)), seed=1234)
    eval_rows = parts["eval"][: args.eval_questions]
    keep = ("id", "question", "opa", "opb", "opc", "opd", "cop", "subject_name", "topic_name", "exp", "choice_type")
    sizes = {}
    for name, part in (("train", parts["train"]), ("eval", eval_rows)):
        with open(work / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for row in part:  # cop stays 0-3 (the canonical numbering); the loader detects it
                fh.write(json.dumps({k: row[k] for k in keep if k in row}, ensure_ascii=False) + "\n")
        sizes[name] = len(part)
    sizes["skipped_invalid"] = len(report.issues)
    return sizes


def _run(cmd: list[str], log: Path, stop_at_step: int | None = None, phases_dir: Path | None = None):
    """Run a medlora command, teeing its output to `log`; SIGTERM it once `stop_at_step` is in its phases file."""
    from medlora.phases import read_phases

    started = time.time()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

        def pump():
            for line in proc.stdout:
                fh.write(line)
                fh.flush()
                sys.stdout.write(line)

        pump_thread = threading.Thread(target=pump, daemon=True)
        pump_thread.start()
        signalled = None
        while proc.poll() is None:
            time.sleep(0.5)
            if stop_at_step is not None and signalled is None:
                done = [r["step"] for r in read_phases(phases_dir) if r["phase"] == "step" and r["pid"] == proc.pid]
                if done and max(done) >= stop_at_step:
                    proc.send_signal(signal.SIGTERM)
                    signalled = time.time()
        pump_thread.join(timeout=30)
    ended = time.time()
    return {"cmd": cmd[3:], "exit_code": proc.returncode, "wall_s": round(ended - started, 1), "log": str(log),
            "pid": proc.pid, **({"sigterm_to_exit_s": round(ended - signalled, 1)} if signalled else {})}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else (
        path.stat().st_size if path.exists() else 0)


def _by_process(records: list[dict[str, Any]], pid: int) -> dict[str, Any]:
    from medlora.phases import PhaseLog

    log = PhaseLog(Path("."), enabled=False)
    log.records = [r for r in records if r["pid"] == pid]
    return log.summary()


def run_rehearsal(args: RehearsalArguments) -> Path:
    from medlora import runinfo
    from medlora.runinfo import new_result_path

    work = Path(args.work_dir)
    if work.exists() and any(work.iterdir()):
        raise MedloraError(f"--work_dir {work} is not empty; the rehearsal needs a new directory (it never overwrites)")
    if Path(args.export_dir).exists() and any(Path(args.export_dir).iterdir()):
        raise MedloraError(f"--export_dir {args.export_dir} is not empty; choose a new directory")
    args.validate()
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir()
    split = _write_split(args, work)
    run_dir = work / "run"
    cli = [sys.executable, "-m", "medlora.cli"]
    train = [*cli, "train", "--config", args.train_config, "--model_name_or_path", args.model_name_or_path,
             "--data_path", str(work / "train.jsonl"), "--eval_data_path", str(work / "eval.jsonl"),
             "--output_dir", str(run_dir), "--max_steps", str(args.max_steps), "--eval_steps", str(args.eval_steps),
             "--save_steps", str(args.save_steps), "--eval_strategy", "steps", "--save_strategy", "steps",
             "--eval_accuracy_samples", "0", "--report_to", "none", *shlex.split(args.train_flags)]
    result: dict[str, Any] = {"date": date.today().isoformat(), "kind": "rehearsal", "model": args.model_name_or_path,
                              "config_file": args.train_config, "rehearsal": asdict(args), "split": split,
                              "versions": runinfo.versions(), "hardware": runinfo.hardware(), "commands": {}}
    failed = None
    steps = [("train_until_sigterm", train, args.sigterm_at_step, 128 + signal.SIGTERM),
             ("resume_to_end", [*train, "--resume_from_checkpoint", "auto"], None, 0),
             ("eval", [*cli, "eval", "--model_name_or_path", args.model_name_or_path, "--adapter",
                       str(run_dir / "adapter"), "--data", str(work / "eval.jsonl"), "--limit",
                       str(args.eval_questions), "--output_dir", str(work / "eval"), "--bootstrap_samples", "1000"],
              None, 0),
             ("export", [*cli, "export", "--model_name_or_path", args.model_name_or_path, "--adapter",
                         str(run_dir / "adapter"), "--output_dir", args.export_dir], None, 0)]
    for name, cmd, stop, expect in steps:
        print(f"rehearsal: {name}", flush=True)
        outcome = _run(cmd, work / "logs" / f"{name}.log", stop, run_dir)
        result["commands"][name] = outcome
        if outcome["exit_code"] != expect:
            failed = f"{name} exited {outcome['exit_code']} (expected {expect}); see {outcome['log']}"
            break
    from medlora.phases import read_phases

    records = read_phases(run_dir)
    for name in ("train_until_sigterm", "resume_to_end"):
        if name in result["commands"]:
            result["commands"][name]["phases"] = _by_process(records, result["commands"][name]["pid"])
    result["checkpoints"] = {p.name: _size(p) for p in sorted(run_dir.glob("checkpoint-*"))}
    result["sizes"] = {"adapter_dir": _size(run_dir / "adapter"), "run_dir": _size(run_dir),
                       "export_dir": _size(Path(args.export_dir))}
    if (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        result["metrics"] = {k: metrics.get(k) for k in ("train_loss", "eval_loss", "eval_accuracy", "eval_n",
                                                         "base_eval_accuracy", "global_steps", "tokens_per_second",
                                                         "format", "backend_report", "lora", "wall_time_s",
                                                         "effective_batch_size")}
        result["metrics"]["model_card"] = (run_dir / "MODEL_CARD.md").is_file()
    if (work / "eval" / "summary.json").is_file():
        summary = json.loads((work / "eval" / "summary.json").read_text())
        result["eval"] = {k: summary.get(k) for k in ("accuracy", "ci95", "n", "seconds")}
    export_manifest = Path(args.export_dir) / "medlora_export.json"
    if export_manifest.is_file():
        summary = json.loads(export_manifest.read_text())
        result["export"] = {k: summary.get(k) for k in ("dtype", "tensors", "bytes", "shards", "layout", "check",
                                                        "phases", "wall_s", "lora_layers_merged")}
    result["targets"] = judge(result)
    result["failed"] = failed
    gpu = result["hardware"].get("gpu")
    name = "rehearsal-" + args.model_name_or_path.split(":")[-1].split("/")[-1] + (f"-{args.tag}" if args.tag else "")
    path = new_result_path(args.results_dir, result["date"], gpu, name)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    if failed:
        raise MedloraError(f"rehearsal: {failed}; partial results in {path}")
    return path


def judge(result: dict[str, Any]) -> dict[str, Any]:
    """Each target with the measured value (the worst case over the run)."""
    first = result["commands"].get("train_until_sigterm", {}).get("phases", {})
    second = result["commands"].get("resume_to_end", {}).get("phases", {})
    saves = first.get("saves", []) + second.get("saves", [])
    evals = first.get("evals", []) + second.get("evals", [])
    measured = {
        "checkpoint_save_s": max((s["seconds"] for s in saves), default=None),
        "resume_to_first_new_step_s": second.get("first_step", {}).get("since_process_start_s"),
        "accuracy_eval_500_s": max((e["accuracy_s"] for e in evals), default=None),
    }
    return {k: {"measured": v, "target_below": TARGETS[k], "met": v is not None and v < TARGETS[k]}
            for k, v in measured.items()}
