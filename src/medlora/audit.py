"""Pre-flight audits for the classic silent failures of LoRA SFT. Each raises `AuditError`.

- label mask: no example has every label at -100, every prompt token is masked, every example
  trains a stop token (EOS / end of turn) so the model learns to stop;
- gradient flow: after one forward/backward every LoRA parameter has a finite, non-zero gradient
  (a LoRA that a fused kernel bypasses, or a frozen-by-mistake adapter, shows up here).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from medlora.config import MedloraError

IGNORE_INDEX = -100


class AuditError(MedloraError):
    pass


def audit_labels(
    batch: dict[str, torch.Tensor], completion_masks: Sequence[Sequence[int]], stop_ids: Sequence[int]
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
        if not any(int(t) in stop_ids for t in row_labels[trained].tolist()):
            problems.append(f"example {i}: no stop token {list(stop_ids)} is trained; the model would never stop")
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
