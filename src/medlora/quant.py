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

import re
from dataclasses import dataclass
from typing import Any

import torch

from medlora.errors import ConfigError, MedloraError

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


def quantize_experts(model) -> dict[str, Any]:
    """Quantise every routed-expert tensor of `model` (a model or one block) to NF4 in place, where it is, one
    tensor at a time; each bf16 tensor is freed before the next is quantised, and experts already in NF4 are left
    as they are (a checkpoint read by `load_checkpoint_nf4` quantises them as it reads). Returns what is quantised
    (counts, bytes)."""
    experts = [m for m in model.modules() if type(m).__name__ == "NemotronHExperts"]
    if not experts:
        raise ConfigError("--load_in_4bit: this model has no NemotronHExperts module, so medlora's 4-bit path would "
                          "quantise nothing; drop the flag")
    layers, params, nbytes = 0, 0, 0
    for module in experts:
        if not nf4_weights(module):
            _quantize_module(module)
        for name, nf4 in nf4_weights(module).items():
            params, nbytes = params + torch.Size(nf4.shape).numel(), nbytes + nf4.nbytes
        layers += 1
    return {"nf4_expert_layers": layers, "nf4_params": params, "nf4_gib": round(nbytes / 2**30, 3)}


def _quantize_module(module) -> None:
    for name in EXPERT_PARAMS:
        _quantize_projection(module, name, getattr(module, name).data)


def _quantize_projection(experts, proj: str, weight: torch.Tensor) -> None:
    """One full-precision [E, out, in] projection into NF4 buffers and a placeholder parameter (for
    `_quantize_module` and `load_checkpoint_nf4`)."""
    nf4 = Nf4Weight.quantize(weight)
    experts.register_buffer(f"_nf4_{proj}_packed", nf4.packed, persistent=False)
    experts.register_buffer(f"_nf4_{proj}_absmax", nf4.absmax, persistent=False)
    experts.register_buffer(f"_nf4_{proj}_code", nf4.code, persistent=False)
    stored = dict(getattr(experts, "_medlora_nf4", None) or {})
    stored[proj] = (nf4.shape, nf4.dtype)
    placeholder = torch.empty((), dtype=weight.dtype, device=nf4.packed.device).expand(weight.shape)
    setattr(experts, proj, torch.nn.Parameter(placeholder, requires_grad=False))
    experts._medlora_nf4 = stored


LINEAR_SKIP = ("lm_head",)  # as BitsAndBytesConfig: the LM head stays in bf16


def is_4bit(param) -> bool:
    """A bitsandbytes Params4bit (`quantize_linears`): packed NF4 bytes, its shape and absmax in `quant_state`."""
    return getattr(param, "quant_state", None) is not None


def logical_numel(param) -> int:
    """Values a parameter stands for: a bitsandbytes Params4bit holds two a byte (its quant_state has the shape)."""
    return int(torch.Size(param.quant_state.shape).numel()) if is_4bit(param) else param.numel()


def quantize_linears(model, skip: tuple[str, ...] = LINEAR_SKIP) -> dict[str, Any]:
    """Every `nn.Linear` but the LM head to bitsandbytes' `Linear4bit` in NF4 (blocks of 64, fp32 absmax, no
    double quantisation: the experts' format), quantised where its weight is, one layer at a time; its compute
    dtype is the weight's, so under bf16 autocast it dequantises to bf16 for the GEMM. Call it before LoRA is
    attached: PEFT then wraps the 4-bit module as it wraps any linear layer. Returns what was quantised."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_f

    layers, params, nbytes = 0, 0, 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is not torch.nn.Linear or any(full == k or full.endswith("." + k) for k in skip):
                continue
            weight = child.weight.data
            packed, state = bnb_f.quantize_4bit(weight.contiguous(), blocksize=NF4_BLOCK, quant_type="nf4")
            linear = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=weight.dtype,
                                       quant_type="nf4", device="meta")
            linear.weight = bnb.nn.Params4bit(data=packed, requires_grad=False, quant_state=state,
                                              blocksize=NF4_BLOCK, compress_statistics=False, quant_type="nf4",
                                              bnb_quantized=True, module=linear)
            linear.bias = child.bias
            # bitsandbytes' CPU inference path repacks the weight in place (and asserts out % 32 == 0): keep one
            # format everywhere, so training, evaluation and the reports read the same tensors
            linear.support_avx512bf16_for_cpu = False
            setattr(parent, name, linear)
            layers, params = layers + 1, params + weight.numel()
            nbytes += packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
            del weight, child
    return {"nf4_linear_layers": layers, "nf4_linear_params": params, "nf4_linear_gib": round(nbytes / 2**30, 3)}


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
        key, n = str(param.dtype).replace("torch.", ""), logical_numel(param)
        if is_4bit(param):
            key = "nf4 (nn.Linear)"
        elif "lora_" in name:
            key = f"{key} (LoRA)"
        counts[key] = counts.get(key, 0) + n
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))



# ---------------------------------------------------------------- loading a checkpoint with NF4 experts

_EXPERT_KEY = re.compile(r"^(?P<module>.+\.mixer\.experts)\.(?P<expert>\d+)\.(?P<proj>up_proj|down_proj)\.weight$")


def _model_name(key: str) -> str:
    """The model's name of a hub checkpoint key (transformers' nemotron_h rename: backbone. -> model.)."""
    return "model." + key[len("backbone."):] if key.startswith("backbone.") else key


def _place(model, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = tensor


def load_checkpoint_nf4(model, folder, device, dtype: torch.dtype) -> dict[str, Any]:
    """Fill `model` (built on the meta device) from the safetensors of `folder` (the hub layout: one tensor per
    routed expert), quantising the experts as they are read: each projection of a MoE layer is gathered on
    `device` expert by expert into one [E, out, in] tensor, quantised to NF4 and freed, so neither host nor GPU
    memory ever holds more than the layers being gathered (one, or two across a shard boundary) in full
    precision. Every other tensor goes straight to `device` in `dtype` (fp32 where transformers keeps it fp32).
    Returns quantize_experts' summary. A missing tensor is an error naming the checkpoint and the tensor."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    absent = [f for f in files if not (folder / f).is_file()]
    if absent:
        raise MedloraError(f"{folder}: --load_in_4bit reads safetensors checkpoints; {', '.join(absent[:3])} not found")
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) + tuple(
        getattr(model, "_keep_in_fp32_modules", None) or ())
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    wanted = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    gathering: dict[tuple[str, str], tuple[torch.Tensor, set[int]]] = {}
    placed, unexpected = set(), []
    for file in files:
        with safe_open(str(folder / file), framework="pt", device="cpu") as shard:
            for key in shard.keys():
                name = _model_name(key)
                match = _EXPERT_KEY.match(name)
                if match:
                    target = f"{match['module']}.{match['proj']}"
                    if target not in wanted:
                        unexpected.append(key)
                        continue
                    experts = model.get_submodule(match["module"])
                    shape = getattr(experts, match["proj"]).shape
                    stack, seen = gathering.setdefault((match["module"], match["proj"]), (
                        torch.empty(shape, dtype=dtype, device=device), set()))
                    stack[int(match["expert"])].copy_(shard.get_tensor(key))
                    seen.add(int(match["expert"]))
                    if len(seen) == shape[0]:  # the projection is complete: to NF4, the full-precision copy freed
                        _quantize_projection(experts, match["proj"], stack)
                        del gathering[(match["module"], match["proj"])]
                        placed.add(target)
                    continue
                if name not in wanted:
                    if not any(p.search(key) for p in ignored):
                        unexpected.append(key)
                    continue
                tensor = shard.get_tensor(key)
                if tensor.is_floating_point():
                    tensor = tensor.to(torch.float32 if any(k in name for k in keep_fp32) else dtype)
                _place(model, name, tensor.to(device))
                placed.add(name)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
        placed |= {n for n, p in model.named_parameters() if not p.is_meta}
    missing = sorted(wanted - placed - {n for n, b in model.named_buffers() if not b.is_meta})
    incomplete = [f"{m}.{p} (experts {sorted(seen)[:3]}... of {stack.shape[0]})" for (m, p), (stack, seen) in
                  gathering.items()]
    lacking = incomplete + missing
    if lacking:
        raise MedloraError(f"{folder}: --load_in_4bit: the checkpoint lacks {len(lacking)} tensor(s) the model needs: "
                           f"{', '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''}")
    if unexpected:
        print(f"{folder}: {len(unexpected)} checkpoint tensor(s) the model does not use, not loaded: "
              f"{', '.join(unexpected[:5])}", flush=True)
    return quantize_experts(model)
