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
    kind = fast.grouped_gemm_kind(x.device, x.dtype)  # the rule training uses (kernels.plan_fast): CPU grouped_mm
    assert kind == fast.load_kernels(fast.DEFAULT_LEVERS, "cpu", dtype=x.dtype)[0].grouped_gemm == "grouped_mm"
    assert torch.equal(called, fast.grouped_lora_experts(mixer.experts, x, index, weights, kind))
    assert rel(called, fast.grouped_lora_experts(mixer.experts, x, index, weights, "loop")) < 1e-6
    ids = torch.randint(5, 500, (2, 12))
    logits = model(input_ids=ids).logits  # the whole reference forward runs on the NF4 experts
    assert torch.isfinite(logits).all()


def test_random_4bit_build_never_holds_two_blocks_of_bf16_experts(monkeypatch):
    """`build_in_memory(..., nf4_experts=True)` (bench `fast+nf4`, `random:` specs with --load_in_4bit): blocks
    are made one at a time and each block's experts quantised before the next exists, so at most one block's
    full-precision experts are ever alive; the result has the bf16 build's structure, deterministic values and
    weight distributions, and quantising it again changes nothing."""
    from transformers import AutoModelForCausalLM

    from medlora.model import build_in_memory

    alive, built = [], []
    real, original = quant._quantize_module, AutoModelForCausalLM.from_config

    def from_config(*args, **kwargs):  # remember the model being built, for the watcher
        built.append(original(*args, **kwargs))
        return built[-1]

    def watching(module):  # how many experts modules hold materialised full-precision weights now
        alive.append(sum(1 for m in experts_of(built[-1]) if not m.up_proj.is_meta and m.up_proj.stride()[0] != 0))
        real(module)

    monkeypatch.setattr(quant, "_quantize_module", watching)
    monkeypatch.setattr(AutoModelForCausalLM, "from_config", from_config)
    model, _ = build_in_memory("tiny", 0, None, nf4_experts=True)
    monkeypatch.undo()
    eager, _ = build_in_memory("tiny", 0, None)
    n_experts = len(experts_of(eager))
    assert len(alive) == n_experts > 1 and max(alive) == 1, alive  # one block's experts at a time
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    assert all(quant.nf4_weights(m) for m in experts_of(model))
    params = dict(model.named_parameters())
    assert set(params) == {n for n, _ in eager.named_parameters()}
    for name, want in eager.named_parameters():
        got = params[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if "experts.up_proj" in name or "experts.down_proj" in name:
            continue  # placeholders; their NF4 values are checked below
        if name.endswith(("norm.weight", "norm_f.weight", "A_log", ".D", "conv1d.bias")):
            assert torch.equal(got, want), name  # deterministic initial values
        elif want.numel() >= 2048:
            assert abs(got.std() / want.std() - 1) < 0.1 and not torch.equal(got, want), name
    for (name, b), (_, ref) in zip(model.named_buffers(), eager.named_buffers()):
        if not name.split(".")[-1].startswith("_nf4"):
            assert torch.equal(b, ref), name
    for got, want in zip(experts_of(model), experts_of(eager)):
        for name, nf4 in quant.nf4_weights(got).items():
            assert abs(nf4.dequantize().std() / getattr(want, name).std() - 1) < 0.1
    again = quant.quantize_experts(model)  # already NF4: nothing changes, the same counts
    assert again["nf4_expert_layers"] == n_experts and again["nf4_params"] == sum(
        getattr(m, n).numel() for m in experts_of(eager) for n in quant.EXPERT_PARAMS)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_4bit_checkpoint_load_quantises_each_projection_as_it_is_read(dtype, tiny_dir, tmp_path, monkeypatch):
    """--load_in_4bit from a hub-layout checkpoint (one tensor per routed expert, sharded so that a layer's experts
    span two files): never through from_pretrained (which would materialise every bf16 expert), each projection
    quantised the moment its last expert is read, and the result equal to from_pretrained + quantising after.
    A checkpoint that lacks an expert tensor is refused with its folder and the tensor named."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    from medlora.config import ModelArguments
    from medlora.errors import MedloraError
    from medlora.model import load_model, save_hub_layout

    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=getattr(torch, dtype))  # fp32 kept where HF keeps it
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (tiny_dir / name).exists():
            shutil.copy(tiny_dir / name, sharded / name)
    written = save_hub_layout(reference, sharded, max_shard_bytes=40_000)
    assert len(written["files"]) > 3
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    files_of_layer = {}
    for key, file in weight_map.items():
        if ".experts." in key:
            files_of_layer.setdefault(key.split(".experts.")[0], set()).add(file)
    assert any(len(f) > 1 for f in files_of_layer.values())  # the boundary case is exercised

    quantised_when = []
    real = quant._quantize_projection
    monkeypatch.setattr(quant, "_quantize_projection", lambda e, p, w: (quantised_when.append(p), real(e, p, w)))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("from_pretrained used"))
    model, _ = load_model(ModelArguments(model_name_or_path=str(sharded), load_in_4bit=True, torch_dtype=dtype))
    monkeypatch.undo()
    assert len(quantised_when) == 2 * len(experts_of(reference))
    assert model.config._name_or_path == str(sharded) and not model.training
    assert model._medlora_quantization["nf4_expert_layers"] == len(experts_of(reference))

    expected = copy.deepcopy(reference)
    quant.quantize_experts(expected)
    quant.quantize_linears(expected)
    got_params = dict(model.named_parameters())
    for name, want in expected.named_parameters():
        got = got_params[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if want.stride() and want.stride()[0] != 0:  # placeholders apart: the same values
            assert torch.equal(got, want), name
        if getattr(want, "quant_state", None) is not None:  # a 4-bit nn.Linear: the same blocks' absmax too
            assert torch.equal(got.quant_state.absmax, want.quant_state.absmax), name
    got_buffers = dict(model.named_buffers())
    for name, want in expected.named_buffers():
        assert torch.equal(got_buffers[name], want) and got_buffers[name].dtype == want.dtype, name

    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    dropped = next(k for k in index["weight_map"] if k.endswith("experts.3.down_proj.weight"))
    from safetensors.torch import load_file, save_file

    file = broken / index["weight_map"][dropped]
    tensors = load_file(str(file))
    del tensors[dropped]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(MedloraError, match=r"broken.*lacks.*down_proj"):
        load_model(ModelArguments(model_name_or_path=str(broken), load_in_4bit=True))
    file.unlink()  # a shard gone: named, not a bare FileNotFoundError
    with pytest.raises(MedloraError, match=rf"broken.*{file.name} not found"):
        load_model(ModelArguments(model_name_or_path=str(broken), load_in_4bit=True))


def test_linear_layers_in_nf4_keep_their_values_to_nf4_error_and_pass_lora_gradients(tiny):
    """quantize_linears: every nn.Linear but the LM head becomes a bitsandbytes Linear4bit (NF4, blocks of 64);
    each computes its input's product with the NF4-rounded weight (~9 % relative, as the experts), parameter
    counts by dtype still add up to the model's, and LoRA attached afterwards gets a gradient on every tensor."""
    import bitsandbytes as bnb

    from medlora.model import apply_lora

    base, _ = tiny
    reference = copy.deepcopy(base).float()
    model = copy.deepcopy(reference)
    linears = {n: m for n, m in reference.named_modules() if type(m) is torch.nn.Linear}
    done = quant.quantize_linears(model)
    modules = dict(model.named_modules())
    assert done["nf4_linear_layers"] == len(linears) - 1 and type(modules["lm_head"]) is torch.nn.Linear
    x = torch.randn(7, reference.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for name, linear in linears.items():
        if name == "lm_head":
            continue
        assert isinstance(modules[name], bnb.nn.Linear4bit), name
        if linear.in_features == x.shape[1]:
            assert 0.05 < rel(modules[name](x), linear(x)) < 0.15, name
    by_dtype = quant.weights_by_dtype(model)
    assert sum(by_dtype.values()) == sum(p.numel() for p in reference.parameters())
    assert by_dtype["nf4 (nn.Linear)"] == done["nf4_linear_params"] == sum(
        m.weight.numel() for n, m in linears.items() if n != "lm_head")
    torch.manual_seed(0)
    model = apply_lora(model, LoraArguments(lora_r=4, lora_alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    lora = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(g is not None and g.norm() > 0 for g in lora.values())
    assert any("in_proj" in n for n in lora) and not any(p.grad is not None for n, p in model.named_parameters()
                                                         if "lora_" not in n)
