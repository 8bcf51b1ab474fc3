"""4-bit routed experts (medlora.quant) on the tiny Nemotron-H, on CPU: NF4 storage, the dequantising grouped GEMM
against the same GEMM on the dequantised bf16/fp32 tensor, gradients, what is saved for backward, the module
forward every non-fast path uses, and the reports. Tolerances: NF4 of Gaussian weights is ~9-10 % relative
(16 levels per 64-value block); the dequantising GEMM must equal the plain GEMM on the dequantised weights to
rounding (1e-6), since it is the same arithmetic."""

import copy

import pytest
import torch

from conftest import rel
from medlora import fast, quant
from medlora.config import LoraArguments


def experts_of(model):
    return [m for m in model.modules() if type(m).__name__ == "NemotronHExperts"]


@pytest.fixture(scope="module")
def pair(tiny):
    """(bf16-valued fp32 model with LoRA, the same model with its experts in NF4 and LoRA), LoRA B non-zero."""
    from medlora.model import apply_lora

    base, _ = tiny
    reference = copy.deepcopy(base).float()
    quantised = copy.deepcopy(reference)
    done = quant.quantize_experts(quantised)
    assert done["nf4_expert_layers"] == len(experts_of(reference)) > 0
    torch.manual_seed(0)
    reference = apply_lora(reference, LoraArguments(lora_r=4, lora_alpha=8))
    torch.manual_seed(0)
    quantised = apply_lora(quantised, LoraArguments(lora_r=4, lora_alpha=8))
    with torch.no_grad():
        for model in (reference, quantised):
            torch.manual_seed(1)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    return reference, quantised


@pytest.mark.parametrize("shape", [(8, 32, 64), (8, 64, 32), (4, 16, 128), (3, 128, 16)])
def test_nf4_error_is_nf4s_for_every_expert_shape(shape):
    """Gaussian weights: NF4 (16 levels, absmax per 64 values) keeps ~9 % relative error whatever the layout —
    rows shorter than a block included (bitsandbytes' CPU kernel gave 29 % for in=32 when handed the 3-D tensor)."""
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02
    back = quant.Nf4Weight.quantize(weight).dequantize()
    assert back.shape == weight.shape and 0.07 < rel(back, weight) < 0.11


def test_nf4_storage_is_per_expert_blocks_at_half_a_byte_a_value(tiny):
    base, _ = tiny
    experts = copy.deepcopy(experts_of(base)[0]).float()
    weight = experts.up_proj.detach().clone()
    nf4 = quant.Nf4Weight.quantize(weight)
    assert nf4.packed.dtype == torch.uint8 and nf4.packed.numel() == weight.numel() // 2
    assert nf4.absmax.numel() == weight.numel() // quant.NF4_BLOCK
    # each expert's blocks are its own: quantising one expert alone gives the same bytes
    alone = quant.Nf4Weight.quantize(weight[1:2])
    per_expert = weight[0].numel() // 2
    assert torch.equal(alone.packed.flatten(), nf4.packed.flatten()[per_expert:2 * per_expert])
    back = nf4.dequantize()
    assert back.shape == weight.shape and back.dtype == weight.dtype
    assert 0.05 < rel(back, weight) < 0.11  # NF4's rounding: real, and bounded
    with pytest.raises(Exception, match="multiple of 64"):
        quant.Nf4Weight.quantize(torch.randn(2, 3, 5))


def test_quantised_model_holds_placeholders_and_reports_dtypes(pair):
    _, quantised = pair
    for experts in experts_of(quantised):
        for name in quant.EXPERT_PARAMS:
            placeholder = getattr(experts, name)
            assert placeholder.stride() == (0, 0, 0) and not placeholder.requires_grad  # 1 value, full shape
            assert placeholder.untyped_storage().nbytes() == placeholder.element_size()
            assert name in quant.nf4_weights(experts)
        # NF4 data are buffers (moved by .to()), never written into a checkpoint
        assert "_nf4_up_proj_packed" in dict(experts.named_buffers()) and "_nf4_up_proj_packed" not in experts.state_dict()
    counts = quant.weights_by_dtype(quantised)
    n_expert = sum(quant.nf4_weights(e)[n].packed.numel() * 2 for e in experts_of(quantised) for n in quant.EXPERT_PARAMS)
    assert counts["nf4 (routed experts)"] == n_expert and counts["float32 (LoRA)"] > 0 and counts["float32"] > 0


@pytest.mark.parametrize("gemm_kind", ["grouped_mm", "loop"])
def test_dequantising_grouped_gemm_equals_the_gemm_on_the_dequantised_weights(pair, gemm_kind):
    """Forward, input gradient and every LoRA factor's gradient of the routed experts with NF4 weights against
    the same module with the dequantised tensor as an ordinary weight; and against the unquantised original,
    within NF4's error."""
    reference, quantised = pair
    q_experts = next(m for m in quantised.modules() if type(m).__name__ == "NemotronHMoE").experts
    r_experts = next(m for m in reference.modules() if type(m).__name__ == "NemotronHMoE").experts
    dequantised = copy.deepcopy(r_experts)  # same LoRA values, the NF4 weights as plain parameters
    base_q, _ = fast._experts_and_lora(q_experts)
    base_d, _ = fast._experts_and_lora(dequantised)
    for name in quant.EXPERT_PARAMS:
        getattr(base_d, name).data = quant.nf4_weights(base_q)[name].dequantize()
    g = torch.Generator().manual_seed(3)
    n_exp, top_k = quantised.config.n_routed_experts, quantised.config.num_experts_per_tok
    x = torch.randn(41, quantised.config.hidden_size, generator=g)
    index = torch.stack([torch.randperm(n_exp, generator=g)[:top_k] for _ in range(41)])
    weights = torch.rand(41, top_k, generator=g)
    results = []
    for experts in (q_experts, dequantised, r_experts):
        inputs = x.clone().requires_grad_(True)
        lora = [p for n, p in experts.named_parameters() if "lora_" in n]
        for p in lora:
            p.grad = None
        out = fast.grouped_lora_experts(experts, inputs, index, weights, gemm_kind)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), inputs.grad, [p.grad.clone() for p in lora]))
    (out_q, dx_q, g_q), (out_d, dx_d, g_d), (out_r, dx_r, _) = results
    assert rel(out_q, out_d) < 1e-6 and rel(dx_q, dx_d) < 1e-6
    assert len(g_q) == len(g_d) > 0 and all(rel(a, b) < 1e-6 and a.norm() > 0 for a, b in zip(g_q, g_d))
    assert 0.01 < rel(out_q, out_r) < 0.25 and rel(dx_q, dx_r) < 0.25  # NF4 error, not a broken kernel


def test_no_dequantised_weight_is_kept_for_backward(pair):
    """The bf16 copy of a projection lives for one GEMM: autograd saves the NF4 reference and the routed
    activations, never a tensor the size of a layer's experts."""
    _, quantised = pair
    experts = next(m for m in quantised.modules() if type(m).__name__ == "NemotronHMoE").experts
    layer_values = min(torch.Size(w.shape).numel() for w in quant.nf4_weights(fast._experts_and_lora(experts)[0]).values())
    saved = []
    x = torch.randn(7, quantised.config.hidden_size, requires_grad=True)
    index = torch.zeros(7, quantised.config.num_experts_per_tok, dtype=torch.long)
    index[:, 1] = 1
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = fast.grouped_lora_experts(experts, x, index, torch.ones(7, index.shape[1]), "loop")
    out.sum().backward()
    assert saved and max(saved) < layer_values


def test_quantised_experts_called_as_a_module_use_the_nf4_weights_with_lora(pair):
    """The reference (transformers) forward, generation and evaluation call the experts module: routed through
    the grouped GEMM it reads the NF4 data and applies the LoRA, never the placeholder."""
    _, quantised = pair
    model = copy.deepcopy(quantised)
    assert fast.route_quantized_experts(model) == len(experts_of(model))
    mixer = next(m for m in model.modules() if type(m).__name__ == "NemotronHMoE")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(13, model.config.hidden_size, generator=g)
    index = torch.stack([torch.randperm(model.config.n_routed_experts, generator=g)[:2] for _ in range(13)])
    weights = torch.rand(13, 2, generator=g)
    called = mixer.experts(x, index, weights)
    assert torch.equal(called, fast.grouped_lora_experts(mixer.experts, x, index, weights, "loop"))
    ids = torch.randint(5, 500, (2, 12))
    logits = model(input_ids=ids).logits  # the whole reference forward runs on the NF4 experts
    assert torch.isfinite(logits).all()
