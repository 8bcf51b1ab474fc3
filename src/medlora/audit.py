"""Pre-flight audits for the classic silent failures of LoRA SFT. Each raises `AuditError`.

- label mask: no example has every label at -100, every prompt token is masked, every example
  trains a stop token (EOS / end of turn) so the model learns to stop;
- gradient flow: after one forward/backward every LoRA parameter has a finite, non-zero gradient
  (a LoRA that a fused kernel bypasses, or a frozen-by-mistake adapter, shows up here);
- trained tokens: every token id the labels train (the stop token above all) has a non-zero input-embedding
  row and LM-head row — LoRA never trains those rows, so a token the base model never learnt (the Nemotron-3
  Base checkpoint's declared eos <|im_end|> has an all-zero row) can never be emitted; and no think tag sits
  inside a trained span unless thinking was asked for.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from medlora.errors import AuditError, MedloraError

IGNORE_INDEX = -100


def audit_labels(
    batch: dict[str, torch.Tensor], completion_masks: Sequence[Sequence[int]], stop_ids: Sequence[int],
    think_ids: dict[int, str] | None = None,
) -> dict[str, Any]:
    """Check a collated batch against the per-example completion masks it was built from."""
    labels, input_ids = batch["labels"], batch["input_ids"]
    problems = []
    trained_total = 0
    for i, mask in enumerate(completion_masks):
        row_labels = labels[i, : len(mask)]
        trained = row_labels != IGNORE_INDEX
        n_trained = int(trained.sum())
        trained_total += n_trained
        if n_trained == 0:
            problems.append(f"example {i}: every label is -100 (nothing is trained)")
            continue
        mask_t = torch.tensor(mask, dtype=torch.bool)
        if bool((trained & ~mask_t).any()):
            problems.append(f"example {i}: {int((trained & ~mask_t).sum())} prompt tokens are trained")
        if bool((~trained & mask_t).any()):
            problems.append(f"example {i}: {int((~trained & mask_t).sum())} completion tokens are masked")
        if not torch.equal(row_labels[trained], input_ids[i, : len(mask)][trained]):
            problems.append(f"example {i}: labels differ from input ids on trained positions")
        trained_ids = row_labels[trained].tolist()
        if not any(int(t) in stop_ids for t in trained_ids):
            problems.append(f"example {i}: no stop token {list(stop_ids)} is trained; the model would never stop")
        tags = sorted({think_ids[t] for t in trained_ids if think_ids and t in think_ids})
        if tags:
            problems.append(f"example {i}: think tag(s) {tags} inside the trained span (the chat template injected "
                            "them, or the data holds them); the model would learn to emit them")
    if problems:
        raise AuditError("label-mask audit failed:\n  " + "\n  ".join(problems[:10]))
    return {"examples": len(completion_masks), "trained_tokens": trained_total,
            "tokens": int(sum(len(m) for m in completion_masks))}


def audit_gradients(model, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One forward/backward on `batch` without changing the weights, RNG or optimizer state.

    LoRA starts with B = 0, where dL/dA = 0 by construction; the audit therefore sets every B to
    small noise for this one pass (and restores it), so a zero gradient means a broken path.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise AuditError("gradient-flow audit failed: the model has no trainable parameters")
    lora = {n for n in params if "lora_" in n}
    if not lora:
        raise AuditError("gradient-flow audit failed: no LoRA parameters are trainable")
    device = next(iter(params.values())).device
    devices = [device.index] if device.type == "cuda" else []
    was_training = model.training
    model.train()
    saved = {n: (None if p.grad is None else p.grad.clone()) for n, p in params.items()}
    for p in params.values():
        p.grad = None
    b_params = [p for n, p in params.items() if "lora_B" in n]
    b_saved = [p.detach().clone() for p in b_params]
    with torch.random.fork_rng(devices=devices):  # the real run's dropout draws stay untouched
        with torch.no_grad():
            for p in b_params:
                p.add_(torch.randn_like(p) * 1e-2)
        inputs = {k: v.to(device) for k, v in batch.items()}
        loss = model(**inputs).loss
        if not torch.isfinite(loss):
            raise AuditError(f"gradient-flow audit failed: the loss of the first batch is {loss.item()}")
        loss.backward()
    dead, nonfinite = [], []
    from medlora.fsdp import full

    for name in sorted(lora):  # FSDP2: gathered whole (a collective, same order on every rank)
        grad = params[name].grad
        grad = None if grad is None else full(grad)
        if grad is None or not bool(grad.abs().sum() > 0):
            dead.append(name)
        elif not bool(torch.isfinite(grad).all()):
            nonfinite.append(name)
    with torch.no_grad():
        for p, original in zip(b_params, b_saved):
            p.copy_(original)
    for n, p in params.items():
        p.grad = saved[n]
    model.train(was_training)
    if dead or nonfinite:
        lines = [f"{len(dead)} of {len(lora)} LoRA parameters got no gradient" + (":" if dead else "")]
        lines += [f"  {n}" for n in dead[:10]] + (["  ..."] if len(dead) > 10 else [])
        if nonfinite:
            lines += [f"{len(nonfinite)} got a non-finite gradient:"] + [f"  {n}" for n in nonfinite[:10]]
        raise AuditError("gradient-flow audit failed: " + "\n".join(lines))
    return {"lora_tensors": len(lora), "loss": float(loss.item())}


def zero_weight_rows(model, ids: Sequence[int]) -> dict[int, str]:
    """{id: 'input-embedding' | 'LM-head' | 'input-embedding and LM-head' | 'no'} for ids whose row is all zero."""
    from medlora.fsdp import full

    rows = {}
    for what, module in (("input-embedding", model.get_input_embeddings()), ("LM-head", model.get_output_embeddings())):
        if module is None:
            continue
        weight = full(module.weight.detach())  # FSDP2: gathered on every rank (a collective)
        inside = [i for i in ids if 0 <= i < weight.shape[0]]
        for i in set(ids) - set(inside):
            rows[i] = "no"  # the tokenizer has ids beyond the model's vocabulary
        if inside:
            index = torch.tensor(inside, device=weight.device)
            nonzero = weight.index_select(0, index).abs().amax(dim=1) > 0
            for i, ok in zip(inside, nonzero.tolist()):
                if not ok:
                    rows[i] = what if i not in rows else f"{rows[i]} and {what}"
    return rows


def audit_trained_tokens(model, tokenizer, examples, stop_ids: Sequence[int],
                         think_ids: dict[int, str] | None = None, allow_think: bool = False) -> dict[str, Any]:
    """Every token the labels train has trained weights; no think tag is trained unless asked. `examples`:
    rows with input_ids and completion_mask (the whole training set)."""
    counts: dict[int, int] = {}
    think_examples = 0
    for example in examples:
        trained = {t for t, m in zip(example["input_ids"], example["completion_mask"]) if m}
        for t in trained:
            counts[t] = counts.get(t, 0) + 1
        think_examples += bool(think_ids and trained & set(think_ids))
    zeros = zero_weight_rows(model, sorted(counts))
    if zeros:
        def name(t):
            return f"{t} {tokenizer.convert_ids_to_tokens(t)!r}" + (" (the stop token)" if t in stop_ids else "")

        listed = "; ".join(f"{name(t)}: all-zero {where} row, trained in {counts[t]} examples"
                           for t, where in sorted(zeros.items(), key=lambda kv: (kv[0] not in stop_ids, kv[0]))[:5])
        fix = ("--stop_token auto picks a separator the model has trained (for a Nemotron-3 Base checkpoint </s>), "
               "or name one with --stop_token" if any(t in stop_ids for t in zeros) else
               "remove these tokens from the training text")
        raise AuditError(f"token audit failed: {len(zeros)} trained token id(s) were never trained in this model, and "
                         f"LoRA does not train embedding or LM-head rows, so it could never learn to emit them: "
                         f"{listed}. Fix: {fix}" + ("; chat style on a base model trains the template's untrained "
                                                    "end-of-turn token: use --style plain, or an instruct checkpoint"
                                                    if len(stop_ids) > 1 and any(t in stop_ids for t in zeros) else ""))
    if think_examples and not allow_think:
        tags = ", ".join(sorted(think_ids.values()))
        raise AuditError(f"label audit failed: {think_examples} training examples train a think tag ({tags}); the "
                         "chat template injected it into the answer, or the data holds it. Answers must not teach "
                         "the model to emit think tags (pass --enable_thinking true if that is what you want)")
    return {"trained_token_ids": len(counts), "stop_token_ids": list(stop_ids), "think_tag_examples": think_examples}


def check_packed(prepared, train_ds) -> None:
    """Every training example appears in TRL's packed rows exactly once, with the same tokens and labels."""
    from collections import Counter

    from medlora.data import masked_labels

    want = Counter((tuple(e["input_ids"]), tuple(masked_labels(e))) for e in train_ds)
    got: Counter = Counter()
    for row in prepared:
        start = 0
        for n in row["seq_lengths"]:
            got[(tuple(row["input_ids"][start:start + n]), tuple(row["labels"][start:start + n]))] += 1
            start += n
    if got != want:
        raise AuditError(f"TRL packing changed the training set: {sum((want - got).values())} of {len(train_ds)} "
                         f"examples missing or altered, {sum((got - want).values())} unexpected")


def run_audits(trainer, train_ds, tokenizer, options, enabled: bool = True) -> dict[str, Any]:
    """Before step 1: TRL kept every example; then (unless `enabled` is false) the label-mask, trained-token and
    gradient-flow audits on the trainer's own collated batches."""
    from medlora.data import masked_labels
    from medlora.formatting import stop_token_ids, think_token_ids

    prepared, args = trainer.train_dataset, trainer.args
    if args.packing:
        check_packed(prepared, train_ds)
    elif len(prepared) != len(train_ds):  # TRL drops fully masked rows; none may vanish silently
        raise AuditError(f"TRL dropped {len(train_ds) - len(prepared)} of {len(train_ds)} training examples")
    if not enabled:
        return {}
    n = min(len(train_ds), max(args.per_device_train_batch_size, 8))
    stops = stop_token_ids(tokenizer, options)
    if args.packing:  # the label audit reads rows; packed rows were checked against them above
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        rows = [{"input_ids": train_ds[i]["input_ids"], "labels": masked_labels(train_ds[i])} for i in range(n)]
        batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(rows)
    else:
        batch = trainer.data_collator([prepared[i] for i in range(n)])
    think = think_token_ids(tokenizer)
    audits = {"labels": audit_labels(batch, [train_ds[i]["completion_mask"] for i in range(n)], stops,
                                     None if options.enable_thinking else think)}
    audits["tokens"] = audit_trained_tokens(trainer.model, tokenizer, train_ds, stops, think, options.enable_thinking)
    # a few examples reach every LoRA tensor (a routed expert's adapter is one tensor for all experts); the
    # audit's loss projects every position onto the vocabulary in fp32 (batch x length x 131,072 floats,
    # with their gradient: at batch 64 the likeliest cause of the 87.6 GiB peak of the first rehearsal)
    small = trainer.data_collator([prepared[i] for i in range(min(len(prepared), 4, args.per_device_train_batch_size))])
    with trainer.phases.timed("gradient_audit"):
        audits["gradients"] = audit_gradients(trainer.model, small)
    return audits
