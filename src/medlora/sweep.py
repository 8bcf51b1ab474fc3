"""`medlora sweep`: a hyper-parameter search over a training config, on Optuna (TPE sampler, median pruning on
the intermediate eval accuracy).

    uv run medlora sweep --config configs/tiny.yaml --space configs/sweep-tiny.yaml --n_trials 3

Every trial is an ordinary `train` run in SWEEP_DIR/trial-NNN (adapter, metrics.json, model card, checkpoints),
with the space's values as flags on top of the config. A pruned trial stops at the evaluation that pruned it and
is kept as the run it is, recorded as pruned. After every trial SWEEP_DIR gets results.csv, results.md,
results.png (the metric against each parameter) and best.yaml (the config with the best values, ready to
train). The study lives in SWEEP_DIR/optuna.journal: running the same command again continues it (trials cut off
by a kill are marked failed and the remaining ones run); the run lock keeps a second sweep off the directory.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medlora.config import need, need_count, need_text, parse_config, read_yaml_mapping, training_sections
from medlora.errors import ConfigError, MedloraError, shown

SPEC_KEYS = {"choices", "low", "high", "log", "step"}


@dataclass
class SweepArguments:
    train_config: str = field(default="configs/tiny.yaml", metadata={
        "help": "the training config every trial starts from (`medlora sweep --config FILE` sets it)"})
    space: str = field(default="configs/sweep-tiny.yaml", metadata={
        "help": "YAML: option -> {choices: [...]} or {low: L, high: H, log: true, step: S}"})
    n_trials: int = field(default=10, metadata={"help": "trials in the study (completed and pruned ones count)"})
    sweep_dir: str = field(default="outputs/sweep", metadata={"help": "trials, results and the study go here"})
    metric: str = field(default="eval_accuracy", metadata={
        "help": "maximised: the run's final eval_accuracy; pruning reads the same metric at each evaluation"})
    pruner: str = field(default="median", metadata={"help": "median (Optuna's MedianPruner) or none"})
    pruner_startup_trials: int = field(default=1, metadata={"help": "trials completed before any is pruned"})
    pruner_warmup_steps: int = field(default=0, metadata={"help": "steps of a trial before it may be pruned"})
    seed: int = field(default=0, metadata={"help": "seed of the TPE sampler"})
    train_flags: str = field(default="", metadata={"help": "extra flags for every trial, e.g. '--max_steps 30'"})
    overwrite: bool = field(default=False, metadata={"help": "start the study over (removes medlora's trials)"})

    def validate(self) -> None:
        for name in ("train_config", "space", "sweep_dir"):
            need_text(getattr(self, name), f"--{name}")
        need_count(self.n_trials, "--n_trials", 1, 10_000)
        need_count(self.pruner_startup_trials, "--pruner_startup_trials", 0, 10_000)
        need_count(self.pruner_warmup_steps, "--pruner_warmup_steps", 0, 10**8)
        need_count(self.seed, "--seed", 0, 2**32 - 1)
        need(self.pruner in ("median", "none"), f"--pruner must be median or none, got {shown(self.pruner)}")
        need(self.metric in ("eval_accuracy", "eval_general_accuracy"),
             f"--metric must be eval_accuracy or eval_general_accuracy, got {shown(self.metric)}")
        try:
            shlex.split(self.train_flags)
        except ValueError as err:
            raise ConfigError(f"--train_flags: {err}") from None


# ---------------------------------------------------------------- the search space


def read_space(path: str) -> dict[str, dict[str, Any]]:
    """The space file, checked: every key a training option, every value a choices list or a numeric range."""
    from medlora.config import _field_map

    space = read_yaml_mapping(path)
    need(bool(space), f"{path}: the search space is empty; name at least one option")
    known = _field_map(training_sections())
    for name, spec in space.items():
        if name not in known:
            import difflib

            close = difflib.get_close_matches(str(name), list(known), n=1)
            raise ConfigError(f"{path}: '{name}' is not a training option" + (f" (did you mean '{close[0]}'?)"
                                                                              if close else ""))
        need(name not in ("output_dir", "resume_from_checkpoint", "overwrite"),
             f"{path}: '{name}' is set by the sweep itself, not searched")
        need(isinstance(spec, dict) and bool(spec) and set(spec) <= SPEC_KEYS,
             f"{path}: '{name}' must be {{choices: [...]}} or {{low: L, high: H[, log: true][, step: S]}}, got "
             f"{shown(spec)}")
        if "choices" in spec:
            need(set(spec) == {"choices"} and isinstance(spec["choices"], list) and len(spec["choices"]) >= 1
                 and all(isinstance(c, (int, float, str, bool)) for c in spec["choices"]),
                 f"{path}: '{name}': choices must be a non-empty list of numbers or strings, alone")
            continue
        low, high = spec.get("low"), spec.get("high")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high))
        need(numbers and low < high, f"{path}: '{name}': low < high, both finite numbers, got {shown(low)}, "
             f"{shown(high)}")
        need(not spec.get("log") or low > 0, f"{path}: '{name}': a log range needs low > 0")
    return space


def suggest(trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    values = {}
    for name, spec in space.items():
        if "choices" in spec:
            values[name] = trial.suggest_categorical(name, spec["choices"])
        elif all(isinstance(spec[k], int) for k in ("low", "high")) and not isinstance(spec.get("step", 1), float):
            values[name] = trial.suggest_int(name, spec["low"], spec["high"], step=spec.get("step", 1),
                                             log=bool(spec.get("log")))
        else:
            values[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), step=spec.get("step"),
                                               log=bool(spec.get("log")))
    return values


def _flag(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


# ---------------------------------------------------------------- pruning from inside a trial


def pruning_callback(trial, metric: str):
    """A Trainer callback: reports `metric` at every evaluation; when Optuna prunes, the run stops there (its
    checkpoint and outputs kept) and `pruned_at` says at which step."""
    from transformers import TrainerCallback

    class Pruning(TrainerCallback):
        pruned_at: int | None = None
        last: float | None = None

        def __init__(self):
            self.reported: set[int] = set()

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            value = (metrics or {}).get(metric)
            # The closing evaluation repeats the last in-training step; Optuna keeps one value per step.
            if value is None or state.global_step in self.reported:
                return
            self.last = value
            self.reported.add(state.global_step)
            trial.report(value, state.global_step)
            if trial.should_prune():
                self.pruned_at = state.global_step
                control.should_training_stop = True

    return Pruning()


# ---------------------------------------------------------------- the sweep


def _fingerprint(args: SweepArguments) -> dict[str, Any]:
    return {"train_config_sha256": hashlib.sha256(Path(args.train_config).read_bytes()).hexdigest(),
            "space": read_yaml_mapping(args.space), "train_flags": args.train_flags, "metric": args.metric}


def run_sweep(args: SweepArguments) -> dict[str, Any]:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    from medlora.outputs import claim_output_dir, write_atomic
    from medlora.safety import RunLock

    args.validate()
    need(Path(args.train_config).is_file(), f"--config {args.train_config}: no such file")
    space = read_space(args.space)
    read_yaml_mapping(args.train_config)
    sweep_dir = Path(args.sweep_dir)
    lock = None

    def take_lock():
        nonlocal lock
        lock = RunLock(sweep_dir).acquire()

    claim_output_dir(sweep_dir, "sweep", args.overwrite, keep=not args.overwrite, inputs=[args.train_config, args.space],
                     option="--sweep_dir", before_changes=take_lock)
    if lock is None:
        take_lock()
    try:
        fingerprint = _fingerprint(args)
        recorded = sweep_dir / "sweep.json"
        if recorded.is_file():
            before = json.loads(recorded.read_text(encoding="utf-8"))
            differ = sorted(k for k in fingerprint if before.get(k) != fingerprint[k])
            need(not differ, f"--sweep_dir {sweep_dir} holds a sweep with other {', '.join(differ)}; continue it with "
                 "the same config, space and flags, or pass --overwrite true to start over")
        write_atomic(recorded, json.dumps(fingerprint, indent=1) + "\n")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=args.pruner_startup_trials,
                                              n_warmup_steps=args.pruner_warmup_steps)
                  if args.pruner == "median" else optuna.pruners.NopPruner())
        study = optuna.create_study(storage=JournalStorage(JournalFileBackend(str(sweep_dir / "optuna.journal"))),
                                    study_name="medlora", direction="maximize", load_if_exists=True,
                                    sampler=optuna.samplers.TPESampler(seed=args.seed), pruner=pruner)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # cut off by a kill
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            print(f"sweep: trial {trial.number} was cut off (the sweep stopped during it): marked failed")
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        remaining = max(0, args.n_trials - done)
        print(f"sweep: {done} trials done in {sweep_dir}, {remaining} to run")

        def objective(trial):
            return _run_trial(trial, args, space, sweep_dir)

        def after_trial(study, trial):
            write_results(study, space, args, sweep_dir)

        study.optimize(objective, n_trials=remaining, catch=(MedloraError,), callbacks=[after_trial])
        return write_results(study, space, args, sweep_dir, final=True)
    finally:
        if lock is not None:
            lock.release()


def _run_trial(trial, args: SweepArguments, space, sweep_dir: Path) -> float:
    import optuna
    import torch

    from medlora.train import train

    values = suggest(trial, space)
    run_dir = sweep_dir / f"trial-{trial.number:03d}"
    trial.set_user_attr("run_dir", str(run_dir))
    argv = ["--config", args.train_config, *shlex.split(args.train_flags), "--output_dir", str(run_dir)]
    for name, value in values.items():
        argv += [f"--{name}", _flag(value)]
    print(f"sweep: trial {trial.number} in {run_dir}: " + ", ".join(f"{k}={v}" for k, v in values.items()), flush=True)
    started = time.time()
    callback = pruning_callback(trial, args.metric)
    try:
        metrics = train(*parse_config(argv, training_sections()), extra_callbacks=[callback])
    except MedloraError as err:
        trial.set_user_attr("error", str(err)[:500])
        raise
    finally:
        gc.collect()  # the next trial loads its own model: free this one's first
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    trial.set_user_attr("seconds", round(time.time() - started, 1))
    if callback.pruned_at is not None:
        trial.set_user_attr("pruned_at_step", callback.pruned_at)
        raise optuna.TrialPruned(f"{args.metric} {callback.last:.4f} at step {callback.pruned_at}")
    value = metrics.get(args.metric) if args.metric != "eval_general_accuracy" else \
        (metrics.get("forgetting") or {}).get("general_accuracy")
    if value is None:
        raise MedloraError(f"trial {trial.number}: the run reported no {args.metric}")
    return float(value)


# ---------------------------------------------------------------- results


def write_results(study, space, args: SweepArguments, sweep_dir: Path, final: bool = False) -> dict[str, Any]:
    """results.csv / .md / .png and best.yaml from the study so far (after every trial: a stopped sweep keeps them)."""
    import yaml

    from medlora.outputs import write_atomic

    names = list(space)
    rows = []
    for t in study.get_trials(deepcopy=False):
        intermediate = t.intermediate_values
        rows.append({"trial": t.number, "state": t.state.name.lower(), args.metric: t.value,
                     "last_reported": intermediate[max(intermediate)] if intermediate else None,
                     "pruned_at_step": t.user_attrs.get("pruned_at_step"), **{n: t.params.get(n) for n in names},
                     "seconds": t.user_attrs.get("seconds"), "run_dir": t.user_attrs.get("run_dir"),
                     "error": t.user_attrs.get("error")})
    columns = ["trial", "state", args.metric, "last_reported", "pruned_at_step", *names, "seconds", "run_dir", "error"]
    text = _csv(rows, columns)
    write_atomic(sweep_dir / "results.csv", text)
    ranked = sorted(rows, key=lambda r: (r[args.metric] is None, -(r[args.metric] or 0)))
    md = ["| " + " | ".join(columns[:-2]) + " |", "|" + "---|" * (len(columns) - 2)]
    md += ["| " + " | ".join("" if r[c] is None else f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c])
                             for c in columns[:-2]) + " |" for r in ranked]
    write_atomic(sweep_dir / "results.md", "\n".join(md) + "\n")
    _plot(rows, names, args.metric, sweep_dir / "results.png")
    complete = [r for r in rows if r["state"] == "complete" and r[args.metric] is not None]
    out: dict[str, Any] = {"trials": rows, "best": None}
    if complete:
        best = max(complete, key=lambda r: r[args.metric])
        config = read_yaml_mapping(args.train_config)
        config.update({n: best[n] for n in names})
        config["output_dir"] = "outputs/sweep-best"
        header = (f"# uv run medlora train --config {sweep_dir / 'best.yaml'}"
                  + (f" {args.train_flags}" if args.train_flags else "") + "\n"
                  f"# best of {len(rows)} trials of `medlora sweep` (trial {best['trial']}, {args.metric} "
                  f"{best[args.metric]:.4f}): {args.train_config} with " + ", ".join(f"{n}={best[n]}" for n in names)
                  + "\n")
        best_yaml = header + yaml.safe_dump(config, sort_keys=False)
        write_atomic(sweep_dir / "best.yaml", best_yaml)
        out["best"] = {"trial": best["trial"], args.metric: best[args.metric], "params": {n: best[n] for n in names},
                       "yaml": best_yaml}
        if final:
            print(f"sweep: best trial {best['trial']} ({args.metric} {best[args.metric]:.4f}); results in "
                  f"{sweep_dir}/results.md, config ready in {sweep_dir / 'best.yaml'}:\n{best_yaml}")
    elif final:
        print(f"sweep: no trial completed; see {sweep_dir}/results.md")
    return out


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _plot(rows, names, metric: str, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend and open figures stay as they are

    fig = Figure(figsize=(4 * len(names), 3.2))
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names):
        values = sorted({r[name] for r in rows if r[name] is not None}, key=str)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        place = (lambda v: v) if numeric else (lambda v: values.index(v))
        for state, style in (("complete", dict(marker="o", color="tab:blue")),
                             ("pruned", dict(marker="x", color="grey"))):
            points = [(place(r[name]), r[metric] if state == "complete" else r["last_reported"]) for r in rows
                      if r["state"] == state and r[name] is not None]
            points = [(x, y) for x, y in points if y is not None]
            if points:
                ax.scatter(*zip(*points), label=state, **style)
        if not numeric:
            ax.set_xticks(range(len(values)), [str(v) for v in values])
        elif values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)
