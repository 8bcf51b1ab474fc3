"""Training stage: one function, `train`, for the CLI, the notebooks and the torchrun scripts.

TRL's SFTTrainer + PEFT LoRA on pre-tokenised examples from `medlora.formatting` (prompt tokens
masked, answer letter first, EOS trained). Before step 1 the label-mask and gradient-flow audits
run; eval loss and MedMCQA accuracy are logged every `eval_steps`; the adapter and `metrics.json`
land in `output_dir`. Under `torchrun` the Trainer runs DDP (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medlora import runinfo
from medlora.audit import audit_gradients, audit_labels, audit_trained_tokens
from medlora.config import (ConfigError, DataArguments, LoraArguments, MedloraError, ModelArguments,
                            RunArguments, to_dict, validate)
from medlora.data import (DataError, LoadReport, check_leakage, format_issues, load_medmcqa, split_rows,
                          write_skipped)
from medlora.evaluate import distributed_score, summarise, write_json
from medlora.formatting import (FormatOptions, choose_stop_token, encode_example, format_record, render_example,
                                stop_token_ids, think_token_ids)

RUN_MARKERS = ("metrics.json", "adapter", "trainer_state.json")
FORMAT_FILE = "medlora_format.json"  # in adapter/: how prompts and answers were built


def format_options(data: DataArguments, stop_token: str | None = None) -> FormatOptions:
    """FormatOptions from the flags; `stop_token` is the one `choose_stop_token` picked for the loaded model."""
    if stop_token is None and data.style == "plain" and data.stop_token != "auto":
        stop_token = data.stop_token
    return FormatOptions(style=data.style, include_option_text=data.include_option_text,
                         include_explanation=data.include_explanation, add_bos_token=data.add_bos_token,
                         stop_token=stop_token, enable_thinking=data.enable_thinking)


def resolve_format(data: DataArguments, tokenizer, zero_rows) -> tuple[FormatOptions, dict[str, Any]]:
    """(FormatOptions, record) with the stop token chosen against the model's weights (`zero_rows`, see
    `formatting.choose_stop_token`): a loaded model's rows in `train`, the checkpoint's rows in `inspect`/`prepare`."""
    stop_token, stop = choose_stop_token(tokenizer, data.style, data.stop_token, zero_rows)
    options = format_options(data, stop_token)
    return options, format_record(tokenizer, options, stop)


def describe_format(fmt: dict[str, Any]) -> str:
    stop = fmt["stop"]
    return (f"style {fmt['style']}; stop token {stop['token']!r}" + (f" (id {stop['id']})" if "id" in stop else "")
            + f": {stop['reason']}; BOS {'yes' if fmt['add_bos_token'] else 'no'} ({fmt['bos_source']})")


@dataclass
class TrainingData:
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    reports: list[LoadReport]


def load_training_data(data: DataArguments, output_dir: Path | None = None) -> TrainingData:
    """Train and eval rows: a prepared dir, a separate eval source, or a seeded split of one source."""
    prepared = Path(data.data_path) / "dataset_dict.json"
    reports: list[LoadReport] = []
    if prepared.exists():
        from datasets import load_from_disk

        splits = load_from_disk(data.data_path)
        if "train" not in splits or "eval" not in splits:
            raise DataError(f"{data.data_path}: a prepared dataset needs 'train' and 'eval' splits, has {list(splits)}")
        train_rows, eval_rows = splits["train"].to_list(), splits["eval"].to_list()
    else:
        train_rows, report = load_medmcqa(data.data_path, data.train_split, data.cop_base, data.skip_invalid)
        reports.append(report)
        if data.eval_data_path:
            eval_rows, eval_report = load_medmcqa(data.eval_data_path, data.eval_split, data.cop_base,
                                                  data.skip_invalid)
            reports.append(eval_report)
            check_leakage({"train": train_rows, "eval": eval_rows})
        else:
            parts = split_rows(train_rows, data.eval_fraction, data.split_seed)
            train_rows, eval_rows = parts["train"], parts["eval"]
    if output_dir is not None:
        for report in reports:
            write_skipped(report, output_dir)
    if data.max_train_samples:
        train_rows = train_rows[: data.max_train_samples]
    if data.max_eval_samples:
        eval_rows = eval_rows[: data.max_eval_samples]
    return TrainingData(train_rows, eval_rows, reports)


def tokenize_rows(rows, tokenizer, options: FormatOptions, max_length: int | None, name: str):
    """Pre-tokenised `datasets.Dataset` (input_ids, completion_mask); over-long rows are reported, not cut.

    Truncation would cut the answer and its EOS, so a row longer than `max_length` is left out and
    counted in the returned list instead.
    """
    from datasets import Dataset

    encoded, too_long = [], []
    for row in rows:
        example = encode_example(tokenizer, row, options)
        if max_length and len(example["input_ids"]) > max_length:
            too_long.append(f"{row.get('source', '?')}:{row.get('line', '?')} ({len(example['input_ids'])} tokens)")
            continue
        encoded.append(example)
    if not encoded:
        raise DataError(f"{name}: all {len(too_long)} examples are longer than max_length={max_length} tokens "
                        f"(first: {', '.join(too_long[:3])}); raise --max_length")
    return Dataset.from_list(encoded), too_long


def masked_labels(example: dict[str, Any]) -> list[int]:
    return [t if m else -100 for t, m in zip(example["input_ids"], example["completion_mask"])]


def check_packed(prepared, train_ds) -> None:
    """Every training example appears in TRL's packed rows exactly once, with the same tokens and labels."""
    from collections import Counter

    want = Counter((tuple(e["input_ids"]), tuple(masked_labels(e))) for e in train_ds)
    got: Counter = Counter()
    for row in prepared:
        start = 0
        for n in row["seq_lengths"]:
            got[(tuple(row["input_ids"][start:start + n]), tuple(row["labels"][start:start + n]))] += 1
            start += n
    if got != want:
        raise MedloraError(f"TRL packing changed the training set: {sum((want - got).values())} of {len(train_ds)} "
                           f"examples missing or altered, {sum((got - want).values())} unexpected")


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
    """The checkpoint to resume from: a committed one only (see medlora.safety); torn ones are skipped."""
    from medlora.safety import checkpoint_problem, last_good_checkpoint

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


def make_accuracy_callback(trainer_ref: dict, eval_rows, tokenizer, options, run: RunArguments):
    from transformers import TrainerCallback

    rows = eval_rows[: run.eval_accuracy_samples] if run.eval_accuracy_samples else eval_rows

    class MedMCQAAccuracyCallback(TrainerCallback):
        """After each evaluation, score MedMCQA accuracy on the eval questions and log it."""

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            trainer = trainer_ref["trainer"]
            t0 = time.time()
            preds = distributed_score(trainer.model, tokenizer, rows, options, run.eval_batch_size)
            trainer_ref["accuracy_s"], trainer_ref["accuracy_n"] = time.time() - t0, len(rows)
            accuracy = summarise(preds, bootstrap_samples=0)["accuracy"]
            if metrics is not None:
                metrics["eval_accuracy"] = accuracy
            trainer.log({"eval_accuracy": accuracy, "eval_accuracy_n": len(rows)})

    return MedMCQAAccuracyCallback()


def adapter_checksum(model) -> str:
    """SHA-256 over the trainable (LoRA) tensors, in name order: equal across DDP ranks or a bug."""
    import hashlib

    digest = hashlib.sha256()
    from medlora.fsdp import full

    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:  # FSDP2 shards are gathered (a collective, same order on every rank)
            digest.update(name.encode())
            digest.update(full(param.detach()).float().cpu().numpy().tobytes())
    return digest.hexdigest()


def gather_checksums(model) -> list[str]:
    import torch.distributed as dist

    mine = adapter_checksum(model)
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def train(model_args: ModelArguments, lora_args: LoraArguments, data_args: DataArguments,
          run_args: RunArguments, train_args) -> dict[str, Any]:
    """Fine-tune with LoRA and write OUTPUT_DIR/adapter, metrics.json and MODEL_CARD.md. Returns the metrics.

    The main process holds OUTPUT_DIR/.medlora.lock for the whole run (medlora.safety.RunLock).
    """
    from medlora.safety import RunLock, oom_error

    validate(model_args, lora_args, data_args, run_args, train_args)
    output_dir = Path(train_args.output_dir)
    lock = RunLock(output_dir).acquire() if runinfo.is_main_process() else None
    try:
        return _train(model_args, lora_args, data_args, run_args, train_args, output_dir)
    except torch.OutOfMemoryError as err:
        raise oom_error(err) from None
    finally:
        if lock is not None:
            lock.release()


def _train(model_args: ModelArguments, lora_args: LoraArguments, data_args: DataArguments,
           run_args: RunArguments, train_args, output_dir: Path) -> dict[str, Any]:
    from rich.console import Console
    from transformers import set_seed

    from medlora.safety import Interrupted, make_callbacks

    console = Console(quiet=not runinfo.is_main_process())
    resume = train_args.resume_from_checkpoint
    check_output_dir(output_dir, run_args.overwrite, resume)
    set_seed(train_args.seed)
    started = time.time()
    from medlora.phases import PhaseLog, make_step_clock

    phases = PhaseLog(output_dir, enabled=runinfo.is_main_process())
    if not torch.cuda.is_available() and "bnb" in str(train_args.optim):
        from transformers.training_args import OptimizerNames

        console.print(f"no CUDA GPU: optimizer {train_args.optim.value} -> adamw_torch (bitsandbytes 8-bit needs CUDA)")
        train_args.optim = OptimizerNames.ADAMW_TORCH

    device = torch.device("cuda", runinfo.local_rank()) if torch.cuda.is_available() else None
    from medlora.backends import load_for_training
    from medlora.model import print_lora_table

    # data and resume point first: a bad file or path must not cost a 63 GB model load
    with phases.timed("data"):
        data = load_training_data(data_args, output_dir if runinfo.is_main_process() else None)
    for report in data.reports:
        console.print(f"[bold]data[/] {report.summary()}")
        if report.issues:
            console.print(format_issues(report.issues, "rows skipped (see skipped.jsonl)"))
    resume_path = resolve_resume(output_dir, resume)
    if resume_path:
        phases.event("resume_from", checkpoint=Path(resume_path).name)
    load_started = time.time()
    checkpointing = train_args.gradient_checkpointing
    if run_args.backend == "fast" and checkpointing:
        checkpointing = tuple(run_args.fast_checkpoint_blocks)  # selective: only these block kinds recompute
    model, tokenizer, backend_report = load_for_training(
        run_args.backend, model_args, lora_args, train_args.max_length or 2048, checkpointing,
        train_args.seed, None if run_args.fsdp2 else device, train_args.trust_remote_code, run_args.fast_levers,
        run_args.fast_gpu_arch)
    phases.event("load", time.time() - load_started)
    if run_args.fsdp2:  # loaded to CPU; each rank moves only its shards to its device
        from medlora.fsdp import shard_model

        backend_report = {**backend_report, "sharding": shard_model(model, device)}
        train_args.save_only_model = True  # optimizer state is sharded: checkpoints keep the adapter only
        console.print(f"[bold]FSDP2[/]: {backend_report['sharding']}")
    if run_args.backend in ("unsloth", "fast"):
        train_args.gradient_checkpointing = False  # the backend applied its own checkpointing
    from medlora.audit import zero_weight_rows

    # the token that ends every answer, checked against this model's weights (an untrained eos cannot be learnt)
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

    lora_counts = print_lora_table(model, console)

    from trl import SFTTrainer

    from medlora.compat import patch_trl_cpu_loss

    patch_trl_cpu_loss()
    train_args.completion_only_loss = True
    if train_args.gradient_checkpointing and train_args.gradient_checkpointing_kwargs is None:
        train_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    trainer_ref: dict[str, Any] = {}
    callback = make_accuracy_callback(trainer_ref, data.eval_rows, tokenizer, options, run_args)
    commit, signal_stop, non_finite = make_callbacks(trainer_ref)

    class MedloraSFTTrainer(SFTTrainer):
        def save_model(self, output_dir=None, _internal_call=False):
            if not run_args.fsdp2:
                return super().save_model(output_dir, _internal_call)
            from medlora.fsdp import trainable_state_dict

            state_dict = trainable_state_dict(self.model)  # collective: every rank gathers, rank 0 writes
            if self.args.should_save:
                self._save(output_dir or self.args.output_dir, state_dict=state_dict)

        def evaluate(self, *args, **kwargs):  # eval loss + (callback) MedMCQA accuracy, timed apart
            t0 = time.time()
            result = super().evaluate(*args, **kwargs)
            total = time.time() - t0
            accuracy_s = trainer_ref.pop("accuracy_s", 0.0)
            phases.event("eval", total, step=self.state.global_step, loss_s=round(total - accuracy_s, 3),
                         accuracy_s=round(accuracy_s, 3), accuracy_n=trainer_ref.get("accuracy_n"))
            return result

        def _save_checkpoint(self, *args, **kwargs):
            trainer_ref["save_started"] = time.time()  # CheckpointCommit records the save once committed
            return super()._save_checkpoint(*args, **kwargs)

        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")  # real tokens of this micro-batch, summed on the device (no sync)
            count = mask.sum() if mask is not None and mask.dim() == 2 else torch.tensor(inputs["input_ids"].numel())
            trainer_ref["step_tokens"] = trainer_ref.get("step_tokens", 0) + count
            loss = super().training_step(model, inputs, *args, **kwargs)
            trainer_ref["last_loss"] = loss.detach()  # for the non-finite message; no device sync here
            return loss

    trainer = MedloraSFTTrainer(model=model, args=train_args, train_dataset=train_ds, eval_dataset=eval_ds,
                                processing_class=tokenizer, callbacks=[callback, commit, signal_stop, non_finite, make_step_clock(phases, trainer_ref)])
    trainer_ref["trainer"] = trainer
    trainer_ref["phases"] = phases

    audits = {}
    prepared = trainer.train_dataset
    if train_args.packing:
        check_packed(prepared, train_ds)
    elif len(prepared) != len(train_ds):  # TRL drops fully masked rows; none may vanish silently
        raise MedloraError(f"TRL dropped {len(train_ds) - len(prepared)} of {len(train_ds)} training examples")
    if run_args.audit:
        n = min(len(train_ds), max(train_args.per_device_train_batch_size, 8))
        stops = stop_token_ids(tokenizer, options)
        if train_args.packing:  # the label audit reads rows; packed rows were checked against them above
            from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

            rows = [{"input_ids": train_ds[i]["input_ids"], "labels": masked_labels(train_ds[i])} for i in range(n)]
            batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(rows)
        else:
            batch = trainer.data_collator([prepared[i] for i in range(n)])
        think = think_token_ids(tokenizer)
        audits["labels"] = audit_labels(batch, [train_ds[i]["completion_mask"] for i in range(n)], stops,
                                        None if options.enable_thinking else think)
        audits["tokens"] = audit_trained_tokens(model, tokenizer, train_ds, stops, think, options.enable_thinking)
        # a few examples reach every LoRA tensor (a routed expert's adapter is one tensor for all experts); the
        # audit's loss projects every position onto the vocabulary in fp32 (batch x length x 131,072 floats,
        # with their gradient: at batch 64 the likeliest cause of the 87.6 GiB peak of the first rehearsal)
        small = trainer.data_collator([prepared[i] for i in range(min(len(prepared), 4,
                                                                      train_args.per_device_train_batch_size))])
        with phases.timed("gradient_audit"):
            audits["gradients"] = audit_gradients(trainer.model, small)
        console.print(f"[green]audits passed[/]: labels {audits['labels']}, gradients {audits['gradients']}")

    # The base model is scored on the same eval questions as the final adapter, so they compare directly.
    with trainer.model.disable_adapter(), phases.timed("base_score", n=len(data.eval_rows)):
        base_preds = distributed_score(trainer.model, tokenizer, data.eval_rows, options, run_args.eval_batch_size)
    base_summary = summarise(base_preds, bootstrap_samples=0)

    signal_stop.install()
    try:
        train_result = trainer.train(resume_from_checkpoint=resume_path)
    finally:
        signal_stop.uninstall()
    if signal_stop.signum is not None:
        import signal

        name = signal.Signals(signal_stop.signum).name
        raise Interrupted(f"{name} at step {trainer.state.global_step}: checkpoint saved in "
                          f"{output_dir / f'checkpoint-{trainer.state.global_step}'}; continue with "
                          "--resume_from_checkpoint auto", signal_stop.signum)
    eval_metrics = trainer.evaluate()  # also runs the accuracy callback on the (limited) eval rows

    with phases.timed("final_score", n=len(data.eval_rows)):
        final_preds = distributed_score(trainer.model, tokenizer, data.eval_rows, options, run_args.eval_batch_size)
    final_summary = summarise(final_preds)
    metrics: dict[str, Any] = {
        "train_loss": train_result.training_loss,
        "eval_loss": eval_metrics.get("eval_loss"),
        "eval_accuracy": final_summary["accuracy"],
        "eval_accuracy_ci95": final_summary["ci95"],
        "eval_n": final_summary["n"],
        "base_eval_accuracy": base_summary["accuracy"],
        "base_per_subject": base_summary["per_subject"],
        "majority_baseline": final_summary["majority_baseline"],
        "per_subject": final_summary["per_subject"],
        "global_steps": trainer.state.global_step,
        "train_runtime_s": train_result.metrics.get("train_runtime"),
        "train_samples_per_second": train_result.metrics.get("train_samples_per_second"),
        "num_input_tokens_seen": trainer.state.num_input_tokens_seen or None,
        "effective_batch_size": train_args.per_device_train_batch_size * train_args.gradient_accumulation_steps
        * runinfo.world_size(),
        "world_size": runinfo.world_size(),
        "train_examples": len(train_ds),
        "eval_examples": len(eval_ds),
        "skipped_too_long": {"train": len(train_long), "eval": len(eval_long)},
        "skipped_invalid": sum(len(r.issues) for r in data.reports),
        "audits": audits,
        "format": fmt,
        "backend": run_args.backend,
        "backend_report": backend_report,
        "lora": lora_counts,
        "log_history": trainer.state.log_history,
        "wall_time_s": round(time.time() - started, 1),
        "peak_mem_gib": phases.peak_gib or None,  # the largest of the per-phase peaks (medlora.phases)
        "config": to_dict(model_args, lora_args, data_args, run_args, train_args),
        "versions": runinfo.versions(),
        "hardware": runinfo.hardware(),
    }
    metrics["adapter_sha256_by_rank"] = gather_checksums(trainer.model)
    if len(set(metrics["adapter_sha256_by_rank"])) != 1:
        raise MedloraError(f"DDP ranks ended with different adapters: {metrics['adapter_sha256_by_rank']}")
    if metrics["num_input_tokens_seen"] and metrics["train_runtime_s"]:
        metrics["tokens_per_second"] = metrics["num_input_tokens_seen"] / metrics["train_runtime_s"]
    adapter_state = None
    if run_args.fsdp2:
        from medlora.fsdp import trainable_state_dict

        adapter_state = trainable_state_dict(trainer.model)  # collective, before rank 0 writes alone
    if trainer.is_world_process_zero():
        adapter_dir = output_dir / "adapter"
        t0 = time.time()
        trainer.model.save_pretrained(adapter_dir, save_embedding_layers=False, state_dict=adapter_state)
        tokenizer.save_pretrained(adapter_dir)
        write_json(adapter_dir / FORMAT_FILE, fmt)  # eval, ask and export build prompts exactly as trained
        size = (adapter_dir / "adapter_model.safetensors").stat().st_size
        metrics["adapter_bytes"] = size
        phases.event("adapter_save", time.time() - t0, bytes=size)
        metrics["phases"] = phases.summary()
        write_json(output_dir / "metrics.json", metrics)
        from medlora.modelcard import write_model_card

        write_model_card(output_dir)
        console.print(f"adapter: {adapter_dir} ({size / 2**20:.2f} MiB); metrics: {output_dir / 'metrics.json'}")
        console.print(f"train_loss {metrics['train_loss']:.4f}  eval_loss {metrics['eval_loss']:.4f}  "
                      f"eval_accuracy {metrics['eval_accuracy']:.3f} (base {metrics['base_eval_accuracy']:.3f}, "
                      f"n={metrics['eval_n']})")
    if not math.isfinite(metrics["train_loss"]):
        raise MedloraError(f"training loss is {metrics['train_loss']}; see {output_dir}")
    return metrics
