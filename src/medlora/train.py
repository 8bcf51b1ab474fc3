"""Training stage: one function, `train`, for the CLI, the notebooks and the torchrun scripts.

It reads top to bottom as the run's stages: data -> model -> trainer -> audits -> fit -> finish. TRL's
SFTTrainer + PEFT LoRA on pre-tokenised examples from `medlora.formatting` (prompt tokens masked, answer letter
first, the stop token trained); the trainer is built by `medlora.trainer` exactly as `medlora bench` builds it.
Eval loss and MedMCQA accuracy are logged every `eval_steps`; the adapter, `metrics.json` and `MODEL_CARD.md`
land in `output_dir`. Under `torchrun` the Trainer runs DDP (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
from transformers import EarlyStoppingCallback

from medlora import runinfo
from medlora.audit import run_audits, zero_weight_rows
from medlora.backend import Backend
from medlora.backends import load_for_training, set_sdpa_cudnn
from medlora.config import DataArguments, LoraArguments, ModelArguments, RunArguments, to_dict, validate
from medlora.data import describe_format, format_issues, load_training_data, resolve_format, tokenize_rows
from medlora.errors import Interrupted, MedloraError
from medlora.evaluate import distributed_score, summarise
from medlora.formatting import FORMAT_FILE, render_example
from medlora.phases import PhaseLog
from medlora.runinfo import write_json
from medlora.outputs import claim_output_dir
from medlora.safety import RunLock, check_resume_fingerprint, oom_error, resolve_resume, run_fingerprint
from medlora.trainer import (ForgettingGuard, build_sft_config, build_trainer, find_callback, gather_checksums,
                             run_callbacks)


def train(model_args: ModelArguments, lora_args: LoraArguments, data_args: DataArguments,
          run_args: RunArguments, train_args, extra_callbacks=()) -> dict[str, Any]:
    """Fine-tune with LoRA and write OUTPUT_DIR/adapter, metrics.json and MODEL_CARD.md. Returns the metrics.

    The main process holds OUTPUT_DIR/.medlora.lock for the whole run (medlora.safety.RunLock).
    `extra_callbacks` run after medlora's own (a sweep's pruning callback reads the metrics they log).
    """
    validate(model_args, lora_args, data_args, run_args, train_args)
    output_dir = Path(train_args.output_dir)
    lock = None
    if runinfo.is_main_process():  # other ranks use the directory rank 0 claimed
        def take_lock():
            nonlocal lock
            lock = RunLock(output_dir).acquire()

        inputs = [data_args.data_path, data_args.eval_data_path, model_args.model_name_or_path]
        claim_output_dir(output_dir, "train", run_args.overwrite, keep=bool(train_args.resume_from_checkpoint),
                         inputs=[i for i in inputs if i], before_changes=take_lock)
    try:
        return _run(model_args, lora_args, data_args, run_args, train_args, output_dir, extra_callbacks)
    except torch.OutOfMemoryError as err:
        raise oom_error(err) from None
    finally:
        if lock is not None:
            lock.release()


def _run(model_args, lora_args, data_args, run_args, train_args, output_dir: Path,
         extra_callbacks=()) -> dict[str, Any]:
    from rich.console import Console
    from transformers import set_seed

    main = runinfo.is_main_process()
    console = Console(quiet=not main)
    backend = Backend.from_run(run_args)
    set_seed(train_args.seed)
    phases = PhaseLog(output_dir, enabled=main)
    started = time.time()

    # 1. data, and the resume point: a bad file or path must not cost a 63 GB model load
    with phases.timed("data"):
        data = load_training_data(data_args, output_dir if main else None)
    for report in data.reports:
        console.print(f"[bold]data[/] {report.summary()}")
        if report.issues:
            console.print(format_issues(report.issues, "rows skipped (see skipped.jsonl)"))
    resume_path = resolve_resume(output_dir, train_args.resume_from_checkpoint)
    if data.mix:
        console.print(f"[bold]replay[/] {data.mix['replay']} general rows mixed into {data.mix['medical']} medical "
                      f"({data.mix['ratio']:.1%} of training; {data.mix['replay_unique']} distinct, "
                      f"{data.mix['replay_passes']} passes over the replay rows)")
    fingerprint = run_fingerprint((model_args, lora_args, data_args, run_args), train_args,
                                  {"train": data.train_rows, "eval": data.eval_rows, "general": data.general_rows},
                                  runinfo.world_size())
    if resume_path:  # only the same run, on the same data, continues (a few settings may change, with a warning)
        check_resume_fingerprint(resume_path, fingerprint, say=console.print)
        phases.event("resume_from", checkpoint=Path(resume_path).name)

    # 2. model (LoRA-wrapped by the backend), the answer format checked against its weights, the examples
    model, tokenizer, backend_report = _load(backend, model_args, lora_args, run_args, train_args, phases, console)
    options, fmt = resolve_format(data_args, tokenizer, lambda ids: zero_weight_rows(model, ids))
    console.print("format: " + describe_format(fmt), markup=False, highlight=False)
    if "chat_template" in fmt:
        console.print(f"chat template: {fmt['chat_template']}", markup=False, highlight=False)
    train_ds, train_long = tokenize_rows(data.train_rows, tokenizer, options, train_args.max_length, "train")
    eval_ds, eval_long = tokenize_rows(data.eval_rows, tokenizer, options, train_args.max_length, "eval")
    for name, long in (("train", train_long), ("eval", eval_long)):
        if long:
            console.print(f"[yellow]{len(long)} {name} examples exceed max_length={train_args.max_length} "
                          f"tokens and are left out[/] (first: {', '.join(long[:3])})")
    console.print(f"train {len(train_ds)} examples, eval {len(eval_ds)} examples, style {options.style}")
    console.print("first training example (prompt is masked; «trained»):", markup=False)
    console.print(render_example(tokenizer, train_ds[0]), markup=False, highlight=False)
    from medlora.model import print_lora_table

    lora_counts = print_lora_table(model, console)

    # 3. trainer: the SFT rules and the trainer class `medlora bench` uses too
    config = build_sft_config(train_args, backend, run_args.fsdp2, say=console.print)
    callbacks, signal_stop = run_callbacks(data.eval_rows, tokenizer, options, run_args, data.general_rows)
    callbacks += list(extra_callbacks)
    trainer = build_trainer(model, tokenizer, config, train_ds, eval_ds, callbacks, run_args.fsdp2, phases)
    trainer.fingerprint = fingerprint

    # 4. audits before step 1, and the base model scored on the eval questions the adapter will be scored on
    audits = run_audits(trainer, train_ds, tokenizer, options, run_args.audit)
    if audits:
        console.print(f"[green]audits passed[/]: labels {audits['labels']}, gradients {audits['gradients']}")
    with trainer.model.disable_adapter(), phases.timed("base_score", n=len(data.eval_rows)):
        base_preds = distributed_score(trainer.model, tokenizer, data.eval_rows, options, run_args.eval_batch_size)
    guard = score_general_base(trainer, phases, console)

    # 5. fit: SIGTERM / SIGINT save a checkpoint at the end of the step and stop (exit 128 + signal)
    signal_stop.install()
    try:
        train_result = trainer.train(resume_from_checkpoint=resume_path)
    finally:
        signal_stop.uninstall()
    if signal_stop.signum is not None:
        step = trainer.state.global_step
        raise Interrupted(f"{signal.Signals(signal_stop.signum).name} at step {step}: checkpoint saved in "
                          f"{output_dir / f'checkpoint-{step}'}; continue with --resume_from_checkpoint auto",
                          signal_stop.signum)

    # 6. finish: final eval loss and accuracy, metrics, adapter, model card
    history = list(trainer.state.log_history)  # the evaluations during training (the final one follows)
    if guard is not None:
        guard.watching = False  # the closing evaluation scores the kept adapter; it cannot stop a finished run
    eval_metrics = trainer.evaluate()  # also runs the accuracy callback on the (limited) eval rows
    with phases.timed("final_score", n=len(data.eval_rows)):
        final_preds = distributed_score(trainer.model, tokenizer, data.eval_rows, options, run_args.eval_batch_size)
    metrics = _metrics(trainer, train_result, eval_metrics, summarise(base_preds, bootstrap_samples=0),
                       summarise(final_preds), data, train_ds, eval_ds, train_long, eval_long)
    metrics.update(recipe_metrics(trainer, guard, data, train_args, console, history))
    metrics.update({"audits": audits, "format": fmt, "backend": run_args.backend, "backend_report": backend_report,
                    "lora": lora_counts, "wall_time_s": round(time.time() - started, 1),
                    "config": to_dict(model_args, lora_args, data_args, run_args, config),
                    "adapter_sha256_by_rank": gather_checksums(trainer.model)})
    _write_outputs(trainer, tokenizer, fmt, metrics, output_dir, console)
    if not math.isfinite(metrics["train_loss"]):
        raise MedloraError(f"training loss is {metrics['train_loss']}; see {output_dir}")
    return metrics


def score_general_base(trainer, phases: PhaseLog, console) -> ForgettingGuard | None:
    """The forgetting guard's reference: the base model (adapter off) on the general questions, before step 1."""
    guard = find_callback(trainer, ForgettingGuard)
    if guard is not None:
        with trainer.model.disable_adapter(), phases.timed("base_general_score", n=len(guard.rows)):
            guard.base_accuracy = guard.score(trainer.model)
        console.print(f"forgetting guard: base model {guard.base_accuracy:.3f} on {len(guard.rows)} general "
                      "questions" + (f"; the run stops if it drops more than {guard.max_forgetting}"
                                     if guard.max_forgetting is not None else ""))
    return guard


def recipe_metrics(trainer, guard, data, train_args, console, history) -> dict[str, Any]:
    """What the careful-recipe settings did: the best checkpoint (and the last evaluation, when the adapter is
    the best one), early stopping, the forgetting guard, the replay mixture. Said on the console too."""
    state, out = trainer.state, {}
    by_step: dict[int, dict[str, Any]] = {}
    for entry in history:  # one evaluation logs several entries (loss, accuracy, general accuracy): merged
        if any(k.startswith("eval_") for k in entry):
            by_step.setdefault(entry.get("step"), {"step": entry.get("step")}).update(
                {k: v for k, v in entry.items() if k in ("eval_accuracy", "eval_general_accuracy", "eval_loss")})
    if by_step:
        out["last_eval"] = by_step[max(by_step, key=lambda s: s or 0)]
    if train_args.metric_for_best_model:
        best = state.best_model_checkpoint
        step = state.best_global_step or (int(Path(best).name.split("-")[-1]) if best else None)
        out["best_checkpoint"] = {"metric": train_args.metric_for_best_model, "value": state.best_metric,
                                  "step": step, "checkpoint": Path(best).name if best else None,
                                  "adapter_is_best": bool(train_args.load_best_model_at_end and best)}
        if out["best_checkpoint"]["adapter_is_best"]:
            console.print(f"[bold]best checkpoint[/]: {Path(best).name} ({train_args.metric_for_best_model} "
                          f"{state.best_metric:.4f}); adapter/ holds it (the last evaluation, step "
                          f"{out.get('last_eval', {}).get('step')}, is in metrics.json last_eval)")
    early = find_callback(trainer, EarlyStoppingCallback)
    if early is not None:
        planned = trainer.args.max_steps if trainer.args.max_steps > 0 else None
        stopped = early.early_stopping_patience_counter >= early.early_stopping_patience
        out["early_stopping"] = {"patience": early.early_stopping_patience,
                                 "threshold": early.early_stopping_threshold, "stopped_early": stopped,
                                 "at_step": state.global_step, "planned_steps": planned}
        if stopped:
            console.print(f"[bold]early stopping[/]: no improvement in {early.early_stopping_patience} evaluations; "
                          f"stopped at step {state.global_step}" + (f" of {planned}" if planned else ""))
    if guard is not None:
        final = guard.last_accuracy if guard.last_accuracy is not None else guard.score(trainer.model)
        out["forgetting"] = {"n": len(guard.rows), "base_general_accuracy": guard.base_accuracy,
                             "general_accuracy": final, "drop": round(guard.base_accuracy - final, 4),
                             "max_forgetting": guard.max_forgetting, "stopped": guard.stopped}
        if guard.stopped:
            console.print(f"[bold red]forgetting guard[/]: stopped at step {guard.stopped['step']}: general accuracy "
                          f"{guard.stopped['general_accuracy']:.3f}, {guard.stopped['drop']:.3f} below the base model's "
                          f"{guard.base_accuracy:.3f} (> --max_forgetting {guard.max_forgetting}); "
                          f"checkpoint-{guard.stopped['step']} kept")
        elif guard.max_forgetting is not None and out["forgetting"]["drop"] > guard.max_forgetting:
            console.print(f"[bold red]forgetting guard[/]: the final adapter's general accuracy {final:.3f} is "
                          f"{out['forgetting']['drop']:.3f} below the base model's {guard.base_accuracy:.3f} "
                          f"(> --max_forgetting {guard.max_forgetting}); no evaluation during training saw it, so the "
                          "run was not stopped: evaluate more often (--eval_steps) or pick an earlier checkpoint")
    if data.mix:
        out["data_mix"] = data.mix
    return out


def _load(backend: Backend, model_args, lora_args, run_args, train_args, phases: PhaseLog, console):
    """The backend's loader onto this rank's GPU (to CPU first under FSDP2, which then moves only its shards)."""
    device = torch.device("cuda", runinfo.local_rank()) if torch.cuda.is_available() else None
    checkpointing = train_args.gradient_checkpointing
    if backend.is_fast and checkpointing:
        checkpointing = tuple(run_args.fast_checkpoint_blocks)  # selective: only these block kinds recompute
    sdpa_cudnn = set_sdpa_cudnn(backend, run_args.sdpa_cudnn)  # before Unsloth or transformers build anything
    t0 = time.time()
    model, tokenizer, report = load_for_training(
        backend, model_args, lora_args, max_length=train_args.max_length or 2048,
        gradient_checkpointing=checkpointing, seed=train_args.seed, device=None if run_args.fsdp2 else device,
        trust_remote_code=train_args.trust_remote_code)
    phases.event("load", time.time() - t0)
    report = {**report, "sdpa_cudnn": sdpa_cudnn}
    if run_args.fsdp2:
        from medlora.fsdp import shard_model

        report = {**report, "sharding": shard_model(model, device)}
        console.print(f"[bold]FSDP2[/]: {report['sharding']}")
    return model, tokenizer, report


def _metrics(trainer, train_result, eval_metrics, base, final, data, train_ds, eval_ds, train_long,
             eval_long) -> dict[str, Any]:
    args = trainer.args
    metrics = {
        "train_loss": train_result.training_loss,
        "eval_loss": eval_metrics.get("eval_loss"),
        "eval_accuracy": final["accuracy"],
        "eval_accuracy_ci95": final["ci95"],
        "eval_n": final["n"],
        "base_eval_accuracy": base["accuracy"],
        "base_per_subject": base["per_subject"],
        "majority_baseline": final["majority_baseline"],
        "per_subject": final["per_subject"],
        "global_steps": trainer.state.global_step,
        "train_runtime_s": train_result.metrics.get("train_runtime"),
        "train_samples_per_second": train_result.metrics.get("train_samples_per_second"),
        "num_input_tokens_seen": trainer.state.num_input_tokens_seen or None,
        "effective_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps
        * runinfo.world_size(),
        "world_size": runinfo.world_size(),
        "train_examples": len(train_ds),
        "eval_examples": len(eval_ds),
        "skipped_too_long": {"train": len(train_long), "eval": len(eval_long)},
        "skipped_invalid": sum(len(r.issues) for r in data.reports),
        "log_history": trainer.state.log_history,
        "peak_mem_gib": trainer.phases.peak_gib or None,  # the largest of the per-phase peaks (medlora.phases)
        "versions": runinfo.versions(),
        "hardware": runinfo.hardware(),
    }
    if metrics["num_input_tokens_seen"] and metrics["train_runtime_s"]:
        metrics["tokens_per_second"] = metrics["num_input_tokens_seen"] / metrics["train_runtime_s"]
    return metrics


def _write_outputs(trainer, tokenizer, fmt, metrics, output_dir: Path, console) -> None:
    """adapter/ (+ the format record eval, ask and export read), metrics.json and MODEL_CARD.md, on rank 0."""
    adapter_state = None
    if trainer.fsdp2:
        from medlora.fsdp import trainable_state_dict

        adapter_state = trainable_state_dict(trainer.model)  # collective, before rank 0 writes alone
    if not trainer.is_world_process_zero():
        return
    adapter_dir = output_dir / "adapter"
    staging = output_dir / ".adapter.partial"  # written whole, then renamed: a full disk leaves no half adapter
    t0 = time.time()
    try:
        shutil.rmtree(staging, ignore_errors=True)
        trainer.model.save_pretrained(staging, save_embedding_layers=False, state_dict=adapter_state)
        tokenizer.save_pretrained(staging)
        write_json(staging / FORMAT_FILE, fmt)  # eval, ask and export build prompts exactly as trained
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        os.replace(staging, adapter_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = (adapter_dir / "adapter_model.safetensors").stat().st_size
    metrics["adapter_bytes"] = size
    trainer.phases.event("adapter_save", time.time() - t0, bytes=size)
    metrics["phases"] = trainer.phases.summary()
    write_json(output_dir / "metrics.json", metrics)
    from medlora.modelcard import write_model_card

    write_model_card(output_dir)
    console.print(f"adapter: {adapter_dir} ({size / 2**20:.2f} MiB); metrics: {output_dir / 'metrics.json'}")
    console.print(f"train_loss {metrics['train_loss']:.4f}  eval_loss {metrics['eval_loss']:.4f}  "
                  f"eval_accuracy {metrics['eval_accuracy']:.3f} (base {metrics['base_eval_accuracy']:.3f}, "
                  f"n={metrics['eval_n']})")
