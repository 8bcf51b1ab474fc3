"""The trainer `medlora train` and `medlora bench` share: every SFT rule in one config builder, one trainer.

`build_sft_config` takes TRL `SFTConfig` arguments as the user (or the bench) gave them and applies the rules
every medlora run follows; `build_trainer` makes the `MedloraSFTTrainer` around them. The bench builds its
trainer through these two functions, so it times the trainer that `train` runs (a test compares the configs).
"""

from __future__ import annotations

import copy
import hashlib
import time
from typing import Any

import torch
from trl import SFTTrainer

from medlora.backend import Backend
from medlora.errors import MedloraError
from medlora.phases import PhaseLog, StepClock


def build_sft_config(train_args, backend: Backend, fsdp2: bool = False, say=print):
    """A copy of `train_args` with medlora's SFT rules applied (the caller's object is left as given).

    * the loss is completion-only: pre-tokenised examples carry a completion mask, the prompt is never trained;
    * bitsandbytes' 8-bit optimizers need CUDA: without it, plain AdamW (said once);
    * Unsloth and fast checkpoint activations themselves, so the Trainer's checkpointing is off for them;
    * the Trainer's checkpointing is non-reentrant (LoRA parameters are the only ones needing gradients);
    * FSDP2 shards the optimizer state: checkpoints keep the model (the adapter) only;
    * a resumed run restores the callbacks' state (early stopping's count), as the best checkpoint is restored.
    """
    config = copy.copy(train_args)
    if not torch.cuda.is_available() and "bnb" in str(config.optim):
        from transformers.training_args import OptimizerNames

        say(f"no CUDA GPU: optimizer {getattr(config.optim, 'value', config.optim)} -> adamw_torch (bitsandbytes "
            "8-bit needs CUDA)")
        config.optim = OptimizerNames.ADAMW_TORCH
    if fsdp2:
        config.save_only_model = True
    if backend.checkpoints_itself:
        config.gradient_checkpointing = False
    config.completion_only_loss = True
    config.restore_callback_states_from_checkpoint = True  # early stopping's patience count survives a resume
    if config.gradient_checkpointing and config.gradient_checkpointing_kwargs is None:
        config.gradient_checkpointing_kwargs = {"use_reentrant": False}
    return config


def build_trainer(model, tokenizer, config, train_dataset, eval_dataset=None, callbacks=(), fsdp2: bool = False,
                  phases: PhaseLog | None = None) -> "MedloraSFTTrainer":
    """The SFTTrainer of every medlora run (TRL's CPU loss gap patched), its callbacks bound to it."""
    from medlora.compat import patch_trl_cpu_loss

    patch_trl_cpu_loss()
    # transformers rotates checkpoints (save_total_limit) inside its save, before medlora commits the new one: a
    # kill in between left none complete. The Trainer gets no limit; safety.rotate_checkpoints applies it after
    # the commit (CheckpointCommit), keeping the best checkpoint too.
    trainer_args = copy.copy(config)
    trainer_args.save_total_limit = None
    return MedloraSFTTrainer(model=model, args=trainer_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=tokenizer, callbacks=list(callbacks), fsdp2=fsdp2, phases=phases,
                             save_total_limit=config.save_total_limit)


class MedloraSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer plus what a medlora run keeps track of: FSDP2 adapter saving, the phase log (evaluations
    and checkpoint saves timed), the last loss (for the non-finite message) and each step's real tokens."""

    def __init__(self, *args, fsdp2: bool = False, phases: PhaseLog | None = None, save_total_limit=None, **kwargs):
        self.fsdp2 = fsdp2
        self.save_total_limit = save_total_limit  # applied by safety.rotate_checkpoints after each commit
        self.phases = phases or PhaseLog(kwargs["args"].output_dir, enabled=False)
        self.last_loss = None
        self.step_tokens = None
        self.save_started = None
        self.accuracy_timing: tuple[float, int] | None = None  # (seconds, questions) of the last accuracy scoring
        self.fingerprint = None  # medlora.safety.run_fingerprint: stored with every checkpoint
        super().__init__(*args, **kwargs)
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "bind"):
                callback.bind(self)

    def train(self, *args, **kwargs):
        """TRL's train with every object that exists when it starts (model, tokenizer, datasets) moved out of the
        garbage collector's reach (`gc.freeze`): a full collection otherwise walks all of them, and on a nano-full
        bench each H200 step with one spent 0.38-0.45 s in it. Objects made while training are
        still collected (cycles among the frozen ones wait for the end); `gc.unfreeze` hands them back then."""
        import gc

        gc.collect()
        gc.freeze()
        try:
            return super().train(*args, **kwargs)
        finally:
            gc.unfreeze()

    def create_model_card(self, *args, **kwargs):
        """No TRL README.md: medlora writes MODEL_CARD.md itself, and never a file it was not asked to."""

    def save_model(self, output_dir=None, _internal_call=False):
        if not self.fsdp2:
            return super().save_model(output_dir, _internal_call)
        from medlora.fsdp import trainable_state_dict

        state_dict = trainable_state_dict(self.model)  # collective: every rank gathers, rank 0 writes
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state_dict)

    def evaluate(self, *args, **kwargs):  # eval loss + (callback) MedMCQA accuracy, timed apart
        t0 = time.time()
        result = super().evaluate(*args, **kwargs)
        total = time.time() - t0
        accuracy_s, accuracy_n = self.accuracy_timing or (0.0, None)
        self.accuracy_timing = None
        self.phases.event("eval", total, step=self.state.global_step, loss_s=round(total - accuracy_s, 3),
                          accuracy_s=round(accuracy_s, 3), accuracy_n=accuracy_n)
        return result

    def _save_checkpoint(self, *args, **kwargs):
        self.save_started = time.time()  # CheckpointCommit records the save once it is committed
        return super()._save_checkpoint(*args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        mask = inputs.get("attention_mask")  # real tokens of this micro-batch, summed on the device (no sync)
        count = mask.sum() if mask is not None and mask.dim() == 2 else torch.tensor(inputs["input_ids"].numel())
        self.step_tokens = count if self.step_tokens is None else self.step_tokens + count
        loss = super().training_step(model, inputs, *args, **kwargs)
        self.last_loss = loss.detach()  # for the non-finite message; no device sync here
        return loss


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class MedMCQAAccuracyCallback(_callback_base()):
    """After each evaluation, score MedMCQA accuracy on (the first `limit` of) the eval questions and log it."""

    def __init__(self, rows, tokenizer, options, batch_size: int, limit: int = 0):
        self.rows = rows[:limit] if limit else rows
        self.tokenizer, self.options, self.batch_size = tokenizer, options, batch_size
        self.trainer = None

    def bind(self, trainer) -> None:
        self.trainer = trainer

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        from medlora.evaluate import distributed_score, summarise

        t0 = time.time()
        preds = distributed_score(self.trainer.model, self.tokenizer, self.rows, self.options, self.batch_size)
        self.trainer.accuracy_timing = (time.time() - t0, len(self.rows))
        accuracy = summarise(preds, bootstrap_samples=0)["accuracy"]
        if metrics is not None:
            metrics["eval_accuracy"] = accuracy
        self.trainer.log({"eval_accuracy": accuracy, "eval_accuracy_n": len(self.rows)})


class ForgettingGuard(_callback_base()):
    """After each evaluation, score the general-knowledge questions (the model's other skills) and log the accuracy
    and its drop from the base model's; with `max_forgetting`, a drop beyond it saves a checkpoint and stops the
    run (`stopped` says at which step and by how much)."""

    def __init__(self, rows, tokenizer, options, batch_size: int, max_forgetting: float | None):
        self.rows, self.tokenizer, self.options, self.batch_size = rows, tokenizer, options, batch_size
        self.max_forgetting = max_forgetting
        self.base_accuracy: float | None = None  # set by train() before step 1 (adapter disabled)
        self.stopped: dict[str, Any] | None = None
        self.last_accuracy: float | None = None  # of the latest evaluation (the final one: the adapter kept)
        self.watching = True  # off for the closing evaluation: training is over, nothing is left to stop
        self.trainer = None

    def bind(self, trainer) -> None:
        self.trainer = trainer

    def score(self, model) -> float:
        from medlora.evaluate import distributed_score, summarise

        preds = distributed_score(model, self.tokenizer, self.rows, self.options, self.batch_size)
        return summarise(preds, bootstrap_samples=0)["accuracy"]

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        accuracy = self.score(self.trainer.model)
        drop = self.base_accuracy - accuracy if self.base_accuracy is not None else None
        values = {"eval_general_accuracy": accuracy, "eval_general_drop": drop}
        if metrics is not None:
            metrics.update(values)  # so --metric_for_best_model eval_general_accuracy works too
        self.trainer.log(values)
        self.last_accuracy = accuracy
        if self.watching and self.max_forgetting is not None and drop is not None and drop > self.max_forgetting \
                and not self.stopped:
            self.stopped = {"step": state.global_step, "drop": round(drop, 4), "general_accuracy": accuracy,
                            "base_general_accuracy": self.base_accuracy, "max_forgetting": self.max_forgetting}
            control.should_save = True  # this step's checkpoint is kept, then the run stops
            control.should_training_stop = True


def run_callbacks(eval_rows, tokenizer, options, run, general_rows=()) -> tuple[list, Any]:
    """The callbacks of a `train` run, and the SignalStop among them (installed around `trainer.train`).
    Order matters: the metrics the evaluation callbacks add are what early stopping and the best checkpoint read."""
    from medlora.safety import CheckpointCommit, NonFiniteStop, SignalStop

    signal_stop = SignalStop()
    callbacks = [MedMCQAAccuracyCallback(eval_rows, tokenizer, options, run.eval_batch_size, run.eval_accuracy_samples)]
    if general_rows:
        callbacks.append(ForgettingGuard(list(general_rows), tokenizer, options, run.eval_batch_size,
                                         run.max_forgetting))
    if run.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(run.early_stopping_patience, run.early_stopping_threshold))
    callbacks += [CheckpointCommit(), signal_stop, NonFiniteStop(), StepClock()]
    return callbacks, signal_stop


def find_callback(trainer, kind):
    return next((c for c in trainer.callback_handler.callbacks if isinstance(c, kind)), None)


# ---------------------------------------------------------------- the adapter every rank ends with


def adapter_checksum(model) -> str:
    """SHA-256 over the trainable (LoRA) tensors, in name order: equal across DDP ranks or a bug."""
    from medlora.fsdp import full

    digest = hashlib.sha256()
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
    if len(set(everyone)) != 1:
        raise MedloraError(f"DDP ranks ended with different adapters: {everyone}")
    return everyone
