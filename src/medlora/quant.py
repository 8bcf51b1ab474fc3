"""4-bit routed experts: NF4 (bitsandbytes' functional 4-bit) for the fused 3-D expert tensors.

bitsandbytes' `BitsAndBytesConfig` quantises `nn.Linear` modules only; in Nemotron-3-Nano ~29.4 B of the
~31.6 B parameters are the routed experts (`mixer.experts.up_proj` / `down_proj`, [E, out, in] per MoE
layer), which it leaves in bf16. Here each of those tensors becomes NF4 with its own absmax per block of 64
values (a block never spans two experts: out x in is a multiple of 64), ~0.56 bytes per parameter.

How it is wired:
* `quantize_experts(model)` replaces each expert parameter by a zero-stride placeholder of the same shape,
  dtype and device (2 bytes of storage, so PEFT can still attach its `target_parameters` LoRA to it) and keeps
  the NF4 data as buffers of the experts module (`.to(device)` moves them; cast the model's dtype before
  quantising, never after: the absmax buffers are fp32). The placeholder must never be read as a weight: only
  `medlora.fast.grouped_lora_experts` reads the experts, through `Nf4Weight`.
* `Nf4Weight.gemm` dequantises one projection of one layer into the grouped GEMM, in the forward and again in
  the backward (the bf16 copy is never saved for backward), so the transient bf16 copy is one layer's
  projection (1.28 GB at Nano widths), not the model.
* the adapter stays an ordinary PEFT adapter for the bf16 base: LoRA A/B are fp32 as in every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from medlora.errors import ConfigError

NF4_BLOCK = 64
EXPERT_PARAMS = ("up_proj", "down_proj")


@dataclass
class Nf4Weight:
    """One [E, out, in] expert tensor in NF4: `packed` uint8 (two values a byte), fp32 `absmax` per 64 values."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor  # the 16 NF4 levels
    shape: tuple[int, ...]
    dtype: torch.dtype  # what it dequantises to (the model's dtype)

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "Nf4Weight":
        import bitsandbytes.functional as bnb_f

        if weight[0].numel() % NF4_BLOCK:
            raise ConfigError(f"--load_in_4bit: an expert of shape {tuple(weight.shape[1:])} is not a multiple of "
                              f"{NF4_BLOCK} values, so NF4 blocks would span two experts")
        # flat: blocks are 64 consecutive values of the row-major tensor. Passed as [E, out, in], bitsandbytes 0.50's
        # CPU kernel blocks rows shorter than 64 differently (3x the error for in=32, measured; test_quant)
        flat = weight.detach().reshape(-1).contiguous()
        packed, state = bnb_f.quantize_4bit(flat, blocksize=NF4_BLOCK, quant_type="nf4")
        return cls(packed, state.absmax, state.code, tuple(weight.shape), weight.dtype)

    def dequantize(self) -> torch.Tensor:
        import bitsandbytes.functional as bnb_f

        n = torch.Size(self.shape).numel()
        state = bnb_f.QuantState(absmax=self.absmax, shape=torch.Size([n]), code=self.code,
                                 blocksize=NF4_BLOCK, quant_type="nf4", dtype=self.dtype)
        return bnb_f.dequantize_4bit(self.packed, state).view(self.shape)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.absmax.numel() * self.absmax.element_size()

    def gemm(self, gemm, inputs: torch.Tensor) -> torch.Tensor:
        """`gemm(inputs, W^T)` for `fast.expert_gemm`'s gemm, W dequantised here and again in the backward."""
        return _Nf4ExpertGemm.apply(inputs, self, gemm)


class _Nf4ExpertGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, weight: Nf4Weight, gemm):
        ctx.weight, ctx.gemm, ctx.input_dtype = weight, gemm, inputs.dtype
        return gemm(inputs, weight.dequantize().transpose(1, 2))  # [E, in, out]

    @staticmethod
    def backward(ctx, grad):
        # the experts are frozen: only the input gradient, from a fresh dequantisation
        return ctx.gemm(grad, ctx.weight.dequantize()).to(ctx.input_dtype), None, None


def nf4_weights(experts) -> dict[str, Nf4Weight]:
    """{parameter name: Nf4Weight} of a (quantised) NemotronHExperts module; {} when it is not quantised. Read from
    the module's buffers on every call, so a model moved with `.to()` dequantises where its buffers now are."""
    meta = getattr(experts, "_medlora_nf4", None)
    if not meta:
        return {}
    return {name: Nf4Weight(getattr(experts, f"_nf4_{name}_packed"), getattr(experts, f"_nf4_{name}_absmax"),
                            getattr(experts, f"_nf4_{name}_code"), shape, dtype)
            for name, (shape, dtype) in meta.items()}


def quantize_experts(model, device=None) -> dict[str, Any]:
    """Quantise every routed-expert tensor of `model` to NF4 in place, one tensor at a time; each bf16 tensor is
    freed before the next is quantised. With `device` (a model loaded to CPU) each tensor is quantised on that
    device and only its NF4 form stays there, so the bf16 experts never all sit in GPU memory. Returns what was
    quantised (counts, bytes)."""
    layers, params, nbytes = 0, 0, 0
    for module in model.modules():
        if type(module).__name__ != "NemotronHExperts" or nf4_weights(module):
            continue
        stored = {}
        for name in EXPERT_PARAMS:
            weight = getattr(module, name)
            nf4 = Nf4Weight.quantize(weight.data if device is None else weight.data.to(device))
            # buffers, so `.to()` and `.cuda()` move them; not persistent: never written into a checkpoint
            module.register_buffer(f"_nf4_{name}_packed", nf4.packed, persistent=False)
            module.register_buffer(f"_nf4_{name}_absmax", nf4.absmax, persistent=False)
            module.register_buffer(f"_nf4_{name}_code", nf4.code, persistent=False)
            stored[name] = (nf4.shape, nf4.dtype)
            placeholder = torch.empty((), dtype=weight.dtype, device=nf4.packed.device).expand(weight.shape)
            setattr(module, name, torch.nn.Parameter(placeholder, requires_grad=False))
            params, nbytes = params + weight.numel(), nbytes + nf4.nbytes
            del weight
        module._medlora_nf4 = stored
        layers += 1
    if not layers:
        raise ConfigError("--load_in_4bit: this model has no NemotronHExperts module, so medlora's 4-bit path would "
                          "quantise nothing; drop the flag")
    return {"nf4_expert_layers": layers, "nf4_params": params, "nf4_gib": round(nbytes / 2**30, 3)}


def weights_by_dtype(model) -> dict[str, int]:
    """Parameters by how they are stored: the NF4 experts (counted at their real size, not their placeholders')
    and every other dtype; LoRA parameters apart."""
    counts: dict[str, int] = {}
    quantised_placeholders = set()
    for module in model.modules():
        for name, (shape, _) in getattr(module, "_medlora_nf4", {}).items():
            counts["nf4 (routed experts)"] = counts.get("nf4 (routed experts)", 0) + int(torch.Size(shape).numel())
            quantised_placeholders.add(id(getattr(module, name)))
    for name, param in model.named_parameters():
        if id(param) in quantised_placeholders:
            continue
        key, n = str(param.dtype).replace("torch.", ""), param.numel()
        if "lora_" in name:
            key = f"{key} (LoRA)"
        counts[key] = counts.get(key, 0) + n
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

