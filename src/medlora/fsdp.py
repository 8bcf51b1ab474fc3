"""`--fsdp2 true`: shard the model with PyTorch FSDP2 (`fully_shard`) when one GPU cannot hold a replica.

    torchrun --nproc_per_node=8 scripts/train_multigpu.py --config configs/nano-fsdp2.yaml

Every Nemotron-H block is one FSDP2 unit and the PEFT model is the root: each rank keeps 1/world of
every parameter (frozen base weights and LoRA alike) and all-gathers a block's weights just before
it runs. LoRA gradients are reduce-scattered, the optimizer holds 1/world of the LoRA state, and the
adapter is written as one ordinary PEFT adapter from a gathered full state dict.

Why our own `fully_shard` call instead of accelerate's FSDP plugin: accelerate turns FSDP on only for
GPU-type distributed runs, so its path cannot be tested on the CPU machines (gloo); `fully_shard`
runs the same sharding on CPU and GPU. The Trainer is told the model is already prepared, so it is
not wrapped in DDP as well.

Limits (refused with a message at start-up): backend `fast` (its forward calls a block's mixers
directly, which would bypass FSDP2's per-block all-gather hooks) and `unsloth`; resuming from a
checkpoint (checkpoints hold the adapter only: `save_only_model`). Each rank loads the base model
to CPU memory before sharding, so the host needs world_size x the bf16 checkpoint in RAM.
"""

from __future__ import annotations

from typing import Any

import torch


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter (a collective: every rank must call it); plain tensors as is."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_model(model, device: torch.device | None) -> dict[str, Any]:
    """fully_shard every decoder block, then the root; returns what was done (for metrics.json)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("--fsdp2 needs a distributed launch (torchrun)")
    world = dist.get_world_size()
    device_type = "cuda" if device is not None and device.type == "cuda" else "cpu"
    mesh = init_device_mesh(device_type, (world,))
    # bf16 base + fp32 LoRA: compute in the base dtype, reduce LoRA gradients in fp32
    base_dtype = next(p.dtype for n, p in model.named_parameters() if "lora_" not in n)
    policy = MixedPrecisionPolicy(param_dtype=base_dtype, reduce_dtype=torch.float32) \
        if base_dtype != torch.float32 else MixedPrecisionPolicy()
    blocks = [m for m in model.modules() if type(m).__name__ == "NemotronHBlock"]
    if not blocks:
        raise RuntimeError("--fsdp2: no NemotronHBlock found to shard")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model._is_accelerate_prepared = True  # accelerate: already distributed, do not wrap in DDP as well
    params = list(model.parameters())
    local = sum(p.to_local().numel() if is_dtensor(p) else p.numel() for p in params)
    return {"fsdp2": True, "world_size": world, "units": len(blocks) + 1, "device_type": device_type,
            "param_dtype": str(policy.param_dtype), "reduce_dtype": str(policy.reduce_dtype),
            "sharded_tensors": sum(is_dtensor(p) for p in params), "tensors": len(params),
            "local_fraction_rank0": round(local / sum(p.numel() for p in params), 4)}


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """The unsharded trainable (LoRA) tensors on CPU, by parameter name — never the frozen base.

    A collective: every rank calls it and every rank gets the tensors (in name order, so the all-gathers
    match across ranks). PEFT's `save_pretrained(state_dict=...)` writes them as a normal adapter.
    """
    return {name: full(param.detach()).cpu() for name, param in sorted(model.named_parameters())
            if param.requires_grad}
