"""Backend `fast` against the reference (transformers + PEFT) forward on the tiny Nemotron-H, on CPU in fp32.

Tolerances: fp32 on CPU, so the two paths differ only by summation order (SSD chunked vs HF's chunked
scan, grouped vs per-expert GEMMs): logits/loss within 1e-4 relative, every LoRA gradient within 1e-3
relative (norm of the difference over norm of the reference).
"""

import copy

import pytest
import torch

from conftest import rel
from medlora import fast
from medlora.config import LoraArguments

LOGIT_RTOL, GRAD_RTOL = 1e-4, 1e-3


@pytest.fixture(scope="module")
def lora_pair(tiny):
    from medlora.model import apply_lora

    base, _ = tiny
    torch.manual_seed(0)
    model = apply_lora(copy.deepcopy(base).float(), LoraArguments(lora_r=4, lora_alpha=8))
    with torch.no_grad():  # B = 0 at init would make every LoRA gradient but B's vanish: give B real values
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    fast_model = copy.deepcopy(model)
    fast.enable(fast_model)
    return model, fast_model


def batch(lengths, vocab=2048, seed=0, pad_id=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(5, vocab, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return seqs, ids, mask, labels


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def run(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, lora_grads(model)


def test_fast_matches_reference_logits_loss_and_every_lora_gradient(lora_pair):
    ref, fst = lora_pair
    _, ids, mask, labels = batch([70, 45, 90])  # 90 > chunk_size 32: several SSD chunks, state passing
    out_ref, g_ref = run(ref, input_ids=ids, attention_mask=mask, labels=labels)
    out_fast, g_fast = run(fst, input_ids=ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    assert rel(out_fast.logits[real], out_ref.logits[real]) < LOGIT_RTOL
    assert abs(out_fast.loss.item() - out_ref.loss.item()) < LOGIT_RTOL * abs(out_ref.loss.item())
    assert set(g_fast) == set(g_ref) and len(g_ref) == sum(1 for n, _ in ref.named_parameters() if "lora_" in n)
    for name, g in g_ref.items():
        assert g.norm() > 0, f"{name}: no gradient in the reference"
        assert rel(g_fast[name], g) < GRAD_RTOL, name
    for kind in ("in_proj", "q_proj", "o_proj", "shared_experts.up_proj", "experts.base_layer"):
        assert any(kind in name for name in g_ref), kind  # every kind of target is compared


def test_packed_stream_gives_each_sample_its_own_loss(lora_pair):
    """Three samples packed into one row (TRL padding-free: position_ids restart) == each run alone."""
    _, fst = lora_pair
    seqs, *_ = batch([40, 75, 33], seed=1)
    packed = torch.cat(seqs).unsqueeze(0)
    positions = torch.cat([torch.arange(len(s)) for s in seqs]).unsqueeze(0)
    with torch.no_grad():
        logits = fst(input_ids=packed, position_ids=positions).logits[0]
        start = 0
        for s in seqs:
            alone = fst(input_ids=s.unsqueeze(0)).logits[0]
            assert rel(logits[start:start + len(s)], alone) < LOGIT_RTOL
            start += len(s)


def test_packing_without_boundaries_would_leak(lora_pair):
    """The boundary test above can fail: the same stream read as one sequence gives other logits."""
    _, fst = lora_pair
    seqs, *_ = batch([40, 75], seed=2)
    packed = torch.cat(seqs).unsqueeze(0)
    with torch.no_grad():
        joined = fst(input_ids=packed).logits[0, 40:]
        alone = fst(input_ids=seqs[1].unsqueeze(0)).logits[0]
    assert rel(joined, alone) > 1e-2


@pytest.mark.parametrize("multiple", [1, 16])
@pytest.mark.parametrize("layout", ["no padding", "right padding", "left padding", "packed rows", "one token rows"])
def test_stream_layout_for_every_kind_of_batch(layout, multiple):
    """cu_seqlens (device and host copy), max_len, seq_id and pos agree with the rows' real lengths; padded to a
    multiple, the pad rows are one more sequence after them."""
    torch.manual_seed(0)
    b, length = 4, 9
    mask = position_ids = None
    if layout == "no padding":
        lengths = [length] * b
    elif layout in ("right padding", "left padding"):
        lengths = [9, 3, 7, 1]
        mask = torch.stack([torch.arange(length) < n for n in lengths]).long()
        mask = mask.flip(1) if layout == "left padding" else mask
    elif layout == "packed rows":  # TRL padding-free: each row's position_ids restart at every example
        pieces = [[4, 5], [9], [2, 2, 5], [1, 8]]
        position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in pieces])
        lengths = [n for row in pieces for n in row]
    else:
        b, length, lengths = 5, 1, [1] * 5
    stream = fast.make_stream((b, length), "cpu", mask, position_ids, multiple)
    real, pad = sum(lengths), -sum(lengths) % multiple
    assert stream.tokens == real and stream.pad == pad and (real + pad) % multiple == 0
    lengths = lengths + ([pad] if pad else [])
    want_cu = torch.cumsum(torch.tensor([0] + lengths), 0)
    assert stream.cu_seqlens.dtype == torch.int32 and torch.equal(stream.cu_seqlens.long(), want_cu)
    assert torch.equal(stream.cu_seqlens_host, want_cu) and stream.cu_seqlens_host.device.type == "cpu"
    assert stream.max_len == max(lengths)
    assert torch.equal(stream.seq_id, torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    assert torch.equal(stream.pos, torch.cat([torch.arange(n) for n in lengths]))
    assert stream.seq_idx.shape == (1, sum(lengths)) and stream.seq_idx.dtype == torch.int32
    assert stream.seq_idx is stream.seq_idx  # built once, shared by every layer and the recompute


@pytest.mark.parametrize("packed", [False, True])
def test_stream_padded_to_16_tokens_changes_no_logit_or_gradient(lora_pair, monkeypatch, packed):
    """Every kernel sees a multiple of 16 rows (one Triton specialisation for every batch), and the pad rows
    change nothing: logits and every LoRA gradient equal those of the unpadded stream."""
    _, fst = lora_pair
    seqs, ids, mask, labels = batch([70, 45, 90] if not packed else [40, 75, 33], seed=3)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if packed:  # TRL padding-free rows: no attention mask, position_ids restart (the stream keeps every token)
        inputs = dict(input_ids=torch.cat(seqs)[None], labels=torch.cat(seqs)[None],
                      position_ids=torch.cat([torch.arange(len(s)) for s in seqs])[None])
    real = sum(map(len, seqs))
    assert real % 16  # the stream needs pad rows
    kernels, rows = fast.backbone_of(fst)._medlora_kernels, []
    norm = kernels.rms_norm
    monkeypatch.setattr(kernels, "rms_norm", lambda x, *a: rows.append(x.shape[0]) or norm(x, *a))
    padded, g_padded = run(fst, **inputs)
    assert rows and all(n % 16 == 0 for n in rows) and max(rows) == real + -real % 16
    monkeypatch.setattr(kernels, "stream_multiple", 1)  # what fast[-stream_padding] loads (below)
    rows.clear()
    plain, g_plain = run(fst, **inputs)
    assert max(rows) == real and any(n % 16 for n in rows)
    on = fast.load_kernels(fast.DEFAULT_LEVERS)[0]
    off = fast.load_kernels(tuple(lever for lever in fast.DEFAULT_LEVERS if lever != "stream_padding"))[0]
    assert (on.stream_multiple, off.stream_multiple) == (fast.STREAM_MULTIPLE, 1)
    assert rel(padded.logits, plain.logits) < 1e-6 and abs(padded.loss.item() - plain.loss.item()) < 1e-6
    assert set(g_padded) == set(g_plain) and g_plain
    for name, g in g_plain.items():
        assert rel(g_padded[name], g) < 1e-5, name


def test_stream_builds_fla_conv_chunk_table_once_from_the_host_copy():
    """The Triton conv's (sequence, chunk) table (extra `fast`): equal to fla's own, built once per stream."""
    fla_index = pytest.importorskip("fla.ops.utils")
    lengths = [130, 1, 64, 65, 200]
    mask = torch.stack([torch.arange(200) < n for n in lengths]).long()
    stream = fast.make_stream((len(lengths), 200), "cpu", mask)
    chunks = stream.conv_chunk_indices()
    assert chunks is stream.conv_chunk_indices()
    want = fla_index.prepare_chunk_indices(torch.cumsum(torch.tensor([0] + lengths), 0), 64)
    assert torch.equal(chunks, want) and len(chunks) == 3 + 1 + 1 + 2 + 4


def test_stream_builds_what_the_kernels_read_before_the_first_block(monkeypatch):
    """Stream.derive_for (called by the forward before any block): the SSD's seq_idx and the conv's cu_seqlens and
    chunk table, each built once; nothing for a kernel that is off. Built inside a block instead, compile_blocks'
    graphs traced the build and recompiled on each of the first batches (dynamo guarded on fla's cache)."""
    import sys
    from types import SimpleNamespace

    calls = []

    def prepare_chunk_indices(cu_seqlens, chunk_size, cu_seqlens_cpu=None):
        calls.append((cu_seqlens, chunk_size, cu_seqlens_cpu))
        return torch.zeros(1, 2, dtype=torch.long)

    fla_utils = SimpleNamespace(prepare_chunk_indices=prepare_chunk_indices)  # fla-core's, whose cache dynamo traced
    for name, module in (("fla", SimpleNamespace(ops=None)), ("fla.ops", SimpleNamespace(utils=fla_utils)),
                         ("fla.ops.utils", fla_utils)):
        monkeypatch.setitem(sys.modules, name, module)
    mask = torch.stack([torch.arange(90) < n for n in (90, 17, 40)]).long()
    for ssd, conv, built in ((None, None, set()), (object(), None, {"seq_idx"}),
                             (None, object(), {"cu_seqlens_long", "conv_chunks_64"}),
                             (object(), object(), {"seq_idx", "cu_seqlens_long", "conv_chunks_64"})):
        calls.clear()
        stream = fast.make_stream((3, 90), "cpu", mask, multiple=16)
        stream.derive_for(SimpleNamespace(ssd=ssd, conv=conv))
        assert set(stream._derived) == built
        entries = dict(stream._derived)
        if ssd is not None:
            assert stream.seq_idx is entries["seq_idx"]  # later reads: the same tensors
        if conv is not None:
            assert stream.conv_chunk_indices() is entries["conv_chunks_64"] and len(calls) == 1
            cu, chunk, host = calls[0]
            assert cu is entries["cu_seqlens_long"] and cu.dtype == torch.long and chunk == 64
            assert torch.equal(host, stream.cu_seqlens_host) and torch.equal(cu, stream.cu_seqlens.long())
    assert torch.equal(stream.seq_idx, stream.seq_id.to(torch.int32).unsqueeze(0))


def test_ssd_reference_matches_a_plain_recurrence():
    """The chunked SSD reference (with sequence resets) == the token-by-token Mamba2 recurrence."""
    torch.manual_seed(0)
    T, h, p, n = 50, 3, 4, 5
    x, B, C = torch.randn(T, h, p), torch.randn(T, h, n), torch.randn(T, h, n)
    dt, A, D = torch.rand(T, h) * 0.5, -torch.rand(h) - 0.1, torch.randn(h)
    seq = torch.tensor([0] * 13 + [1] * 30 + [2] * 7)
    state, expected = torch.zeros(h, p, n), []
    for t in range(T):
        if t and seq[t] != seq[t - 1]:
            state = torch.zeros(h, p, n)
        state = torch.exp(dt[t] * A)[:, None, None] * state + dt[t][:, None, None] * x[t][:, :, None] * B[t][:, None, :]
        expected.append(torch.einsum("hpn,hn->hp", state, C[t]) + D[:, None] * x[t])
    got = fast.ssd_reference(x, dt, A, B, C, D, seq, chunk=8)
    assert rel(got, torch.stack(expected)) < 1e-5


def test_grouped_lora_experts_never_form_the_full_delta(lora_pair, monkeypatch):
    """PEFT's path calls get_delta_weight / parametrizes the expert tensor; the fast path must not."""
    from peft.tuners.lora.layer import ParamWrapper

    _, fst = lora_pair
    called = []
    monkeypatch.setattr(ParamWrapper, "get_delta_weight", lambda *a, **k: called.append(1))
    monkeypatch.setattr(ParamWrapper, "_activate_lora", lambda *a, **k: called.append(1))
    _, ids, mask, labels = batch([20, 30])
    out, grads = run(fst, input_ids=ids, attention_mask=mask, labels=labels)
    assert not called
    assert any("experts" in n and g.norm() > 0 for n, g in grads.items())


def test_norm_and_router_functions_equal_transformers_modules(tiny):
    """The pure functions the `compile` lever compiles are the modules they replace (bit for bit, fp32)."""
    base, _ = tiny
    torch.manual_seed(1)
    layers = list(base.model.layers)
    mamba = next(b for b in layers if b.block_type == "linear_attention").mixer
    moe = next(b for b in layers if b.block_type == "moe").mixer
    x = torch.randn(37, base.config.hidden_size)
    norm = layers[0].norm
    with torch.no_grad():
        norm.weight.normal_()
        moe.gate.weight.normal_()
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    assert torch.equal(fast.rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))
    y, gate = torch.randn(37, mamba.intermediate_size), torch.randn(37, mamba.intermediate_size)
    assert torch.equal(fast.gated_rms_norm(y, gate, mamba.norm.weight, mamba.norm.variance_epsilon,
                                           mamba.norm.group_size), mamba.norm(y, gate))
    g = moe.gate
    _, ref_w, ref_i = g(x)
    w, i = fast.route(x, g.weight, g.e_score_correction_bias, g.top_k, g.num_group, g.topk_group,
                      g.norm_topk_prob, g.routed_scaling_factor)
    order, ref_order = i.sort(dim=1), ref_i.sort(dim=1)
    assert torch.equal(order.values, ref_order.values)
    assert torch.allclose(w.gather(1, order.indices), ref_w.gather(1, ref_order.indices), rtol=1e-6, atol=0)


def test_selective_checkpointing_keeps_every_gradient(lora_pair):
    """Checkpointing some block kinds (or all) changes memory, never the gradients."""
    _, fst = lora_pair
    _, ids, mask, labels = batch([50, 33])
    fst.train()
    fast.enable(fst, fast.DEFAULT_LEVERS, gradient_checkpointing=False)
    _, plain = run(fst, input_ids=ids, attention_mask=mask, labels=labels)
    for blocks in (("moe",), ("mamba", "attention"), True):
        info = fast.enable(fst, fast.DEFAULT_LEVERS, gradient_checkpointing=blocks)
        assert info["gradient_checkpointing"].startswith("per block")
        _, grads = run(fst, input_ids=ids, attention_mask=mask, labels=labels)
        assert set(grads) == set(plain)
        for name, g in plain.items():
            assert torch.allclose(grads[name], g, rtol=1e-5, atol=1e-7), (blocks, name)
    fast.enable(fst, fast.DEFAULT_LEVERS, gradient_checkpointing=False)
    with pytest.raises(Exception, match="unknown"):
        fast.enable(fst, fast.DEFAULT_LEVERS, gradient_checkpointing=("attention", "ffn"))


def test_offloaded_checkpoints_move_each_block_input_to_the_host_and_keep_every_gradient(lora_pair):
    """offload_checkpoints: the one tensor each checkpointed block keeps (its input, [tokens, hidden]) leaves for the
    host in forward order and comes back for the recompute; the gradients equal plain checkpointing's. On a CPU the
    'host' copy is a second CPU tensor, so the round trip and the one-layer-ahead prefetch run, the streams not."""
    _, fst = lora_pair
    _, ids, mask, labels = batch([50, 33, 61])
    fst.train()
    try:
        fast.enable(fst, fast.DEFAULT_LEVERS, gradient_checkpointing=True)
        _, plain = run(fst, input_ids=ids, attention_mask=mask, labels=labels)
        for blocks in (True, ("moe",)):
            fast.enable(fst, fast.DEFAULT_LEVERS + ("offload_checkpoints",), gradient_checkpointing=blocks)
            offload = fast.backbone_of(fst)._medlora_kernels.offload
            packed, unpacked = [], []
            pack, unpack = offload.pack, offload.unpack
            offload.pack = lambda t: packed.append(pack(t)) or packed[-1]
            offload.unpack = lambda p: unpacked.append(p) or unpack(p)
            _, grads = run(fst, input_ids=ids, attention_mask=mask, labels=labels)
            layers = fast.backbone_of(fst).layers
            kinds = fast.CHECKPOINT_BLOCKS if blocks is True else blocks
            n = sum(fast.BLOCK_KIND[b.block_type] in kinds for b in layers)
            moved = [p for p in packed if isinstance(p, fast._OnHost)]
            tokens = int(mask.sum()) + (-int(mask.sum()) % fast.STREAM_MULTIPLE)
            assert len(moved) == n > 0 and [p.index for p in moved] == list(range(n))
            assert all(p.host.shape == (tokens, fst.config.hidden_size) for p in moved)
            assert offload.bytes == n * tokens * fst.config.hidden_size * 4
            assert sorted(p.index for p in unpacked if isinstance(p, fast._OnHost)) == list(range(n))
            assert [p.index for p in unpacked if isinstance(p, fast._OnHost)] == list(range(n))[::-1]  # backward
            assert all(p.back is None for p in moved)  # none kept on the device after its recompute
            assert offload.order == [None] * n  # nor on the host once autograd has let go of it
            assert set(grads) == set(plain)
            for name, g in plain.items():
                assert torch.allclose(grads[name], g, rtol=1e-6, atol=1e-8), (blocks, name)
        with pytest.raises(Exception, match="offload_checkpoints"):
            fast.enable(fst, fast.DEFAULT_LEVERS + ("offload_checkpoints",), gradient_checkpointing=False)
    finally:
        fast.enable(fst, fast.DEFAULT_LEVERS, gradient_checkpointing=False)


def test_compiled_blocks_match_eager_with_one_graph_set_for_every_length(lora_pair, monkeypatch):
    """compile_blocks: each block kind as a torch.compile graph (here traced by dynamo + AOTAutograd, `aot_eager`,
    so the CPU test needs no C++ build; the GPU runs inductor): logits and every LoRA gradient equal eager's, with
    checkpointing, and a batch of new lengths compiles nothing more (the token count is symbolic)."""
    import torch._dynamo

    _, fst = lora_pair
    monkeypatch.setattr(fast, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    fst.train()
    try:
        for checkpointing in (False, True):
            first = batch([50, 33], seed=3)
            fast.enable(fst, fast.DEFAULT_LEVERS, gradient_checkpointing=checkpointing)
            out_eager, eager = run(fst, input_ids=first[1], attention_mask=first[2], labels=first[3])
            fast.enable(fst, fast.DEFAULT_LEVERS + ("compile_blocks",), gradient_checkpointing=checkpointing)
            assert fast.backbone_of(fst)._medlora_kernels.block_compute is not fast.block_compute
            out, grads = run(fst, input_ids=first[1], attention_mask=first[2], labels=first[3])
            real = first[2].bool()
            assert rel(out.logits[real], out_eager.logits[real]) < 1e-5
            assert set(grads) == set(eager) and eager
            for name, g in eager.items():
                assert rel(grads[name], g) < 1e-5, (checkpointing, name)
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        other = batch([71, 20, 37], seed=4)  # 128 rows: whole SSD chunks like the first (96), since the CPU's SSD
        # reference takes another path for a partial last chunk (on a GPU the SSD is a Triton kernel outside the graph)
        run(fst, input_ids=other[1], attention_mask=other[2], labels=other[3])
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # no recompile for new lengths
    finally:
        fast.enable(fst, fast.DEFAULT_LEVERS, gradient_checkpointing=False)
        torch._dynamo.reset()


def test_fast_falls_back_with_a_message_on_cpu(capsys):
    kernels, notes = fast.load_kernels(fast.LEVERS, "cpu")
    assert kernels.ssd is None and kernels.conv is None and kernels.varlen_attention is None
    assert any("no CUDA" in n for n in notes)
    assert any("lever compile is for GPUs" in n for n in notes) and kernels.route is fast.route
    with pytest.raises(Exception, match="unknown"):
        fast.load_kernels(("warp_drive",), "cpu")


def test_train_cli_fast_with_packing_and_4bit_experts_and_hf_refuses_packing(tmp_path, capsys):
    """fast trains packed rows, here with --load_in_4bit (routed experts and linear layers in NF4, medlora.quant):
    the gradient audit passes on the 4-bit model, and metrics.json and the model card say what was stored in which
    dtype; eval and ask run on the 4-bit base."""
    import json

    from conftest import run_cli

    common = ["train", "--config", "configs/tiny.yaml", "--max_steps", "3", "--report_to", "none",
              "--tiny_cache_dir", str(tmp_path / "tiny"), "--packing", "true", "--eval_accuracy_samples", "4"]
    refused = run_cli([*common, "--output_dir", str(tmp_path / "hf")])
    assert refused.returncode == 2 and "--backend fast" in refused.stderr and "Traceback" not in refused.stderr
    ok = run_cli([*common, "--backend", "fast", "--load_in_4bit", "true", "--output_dir", str(tmp_path / "fast")])
    assert ok.returncode == 0, ok.stderr[-3000:]
    metrics = json.loads((tmp_path / "fast" / "metrics.json").read_text())
    assert metrics["backend"] == "fast" and metrics["config"]["SFTConfig"]["packing"] is True
    assert metrics["audits"]["gradients"]["lora_tensors"] > 0
    quantization = metrics["backend_report"]["quantization"]
    assert quantization["nf4_expert_layers"] > 0 and quantization["parameters_by_dtype"]["nf4 (routed experts)"] > 0
    assert quantization["nf4_linear_layers"] > 0 and quantization["parameters_by_dtype"]["nf4 (nn.Linear)"] > 0
    assert quantization["parameters_by_dtype"]["float32"] > 0  # the LM head, embeddings and norms stay as they are
    assert "NF4 routed experts" in ok.stdout and "nn.Linear layers" in ok.stdout
    card = (tmp_path / "fast" / "MODEL_CARD.md").read_text()
    assert "in NF4" in card and "nn.Linear layers" in card
    # eval of that adapter on the 4-bit base: the NF4 experts, with the adapter's LoRA, compute through the grouped
    # GEMM (test_quant checks that the module call reads the NF4 data, never the placeholders)
    from conftest import SAMPLE, run_main

    code, out, err = run_main(["eval", "--model_name_or_path", "tiny", "--tiny_cache_dir", tmp_path / "tiny",
                               "--adapter", tmp_path / "fast" / "adapter", "--load_in_4bit", "true", "--data", SAMPLE,
                               "--limit", "4", "--output_dir", tmp_path / "ev"], capsys)  # in-process: no startup
    assert code == 0, err[-3000:]
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["n"] == 4 and 0 <= summary["accuracy"] <= 1 and "NF4 routed experts" in out
    code, out, err = run_main(["ask", "Which nerve?", "--options", "Radial", "Axillary", "Ulnar", "Median",
                               "--model_name_or_path", "tiny", "--tiny_cache_dir", tmp_path / "tiny", "--adapter",
                               tmp_path / "fast" / "adapter", "--load_in_4bit", "true", "--max_new_tokens", "2"], capsys)
    assert code == 0, err[-3000:]
    assert "NF4 routed experts" in out and json.loads(out[out.rindex("\n{"):])["letter"] in ("A", "B", "C", "D")


def test_check_packed_notices_a_lost_or_altered_example():
    from medlora.audit import check_packed
    from medlora.errors import MedloraError

    examples = [{"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]}, {"input_ids": [8, 9], "completion_mask": [0, 1]}]
    good = [{"input_ids": [8, 9, 5, 6, 7], "labels": [-100, 9, -100, 6, 7], "seq_lengths": [2, 3]}]
    check_packed(good, examples)
    altered = [{"input_ids": [8, 9, 5, 6, 7], "labels": [-100, 9, -100, -100, 7], "seq_lengths": [2, 3]}]
    with pytest.raises(MedloraError, match="1 of 2 examples missing or altered"):
        check_packed(altered, examples)
    with pytest.raises(MedloraError, match="missing"):
        check_packed([{"input_ids": [8, 9], "labels": [-100, 9], "seq_lengths": [2]}], examples)


@pytest.mark.parametrize("gemm_kind, fused_act", [("grouped_mm", False), ("loop", False), ("grouped_mm", True)])
def test_grouped_lora_experts_equal_peft_in_fp32(lora_pair, gemm_kind, fused_act):
    """The routed experts alone: medlora's grouped LoRA (grouped GEMMs on the routed tokens) against PEFT's
    target_parameters forward of the same module — output, input and routing-weight gradients and every LoRA
    factor's gradient; also with relu² x routing weight fused (the weight in front of the down projection)."""
    from medlora import fused

    ref_model, _ = lora_pair
    mixer = next(m for m in ref_model.modules() if type(m).__name__ == "NemotronHMoE")
    experts = mixer.experts
    g = torch.Generator().manual_seed(1)
    width = mixer.fc1_latent_proj(torch.zeros(1, ref_model.config.hidden_size)).shape[-1]
    x = torch.randn(37, width, generator=g, requires_grad=True)
    n_exp, top_k = ref_model.config.n_routed_experts, ref_model.config.num_experts_per_tok
    index = torch.stack([torch.randperm(n_exp, generator=g)[:top_k] for _ in range(37)])
    weights = torch.rand(37, top_k, generator=g, requires_grad=True)
    lora = [p for n, p in experts.named_parameters() if "lora_" in n]
    assert lora, "the experts carry LoRA factors"
    assert fast.is_relu2(fast._experts_and_lora(experts)[0].act_fn)  # the fused path applies to this model
    moe = fused.MoeKernels.for_device(False) if fused_act else None
    results = []
    for forward in (lambda: experts(x, index, weights),
                    lambda: fast.grouped_lora_experts(experts, x, index, weights, gemm_kind, moe)):
        for p in [x, weights, *lora]:
            p.grad = None
        out = forward()
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), x.grad.clone(), weights.grad.clone(), [p.grad.clone() for p in lora]))
    (ref_out, ref_dx, ref_dw, ref_grads), (out, dx, dw, grads) = results
    assert rel(out, ref_out) < 1e-5 and rel(dx, ref_dx) < 1e-5 and rel(dw, ref_dw) < 1e-5 and ref_dw.norm() > 0
    assert all(rel(a, b) < 1e-5 and b.norm() > 0 for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("gemm_kind", ["grouped_mm", "loop"])
def test_expert_gemms_run_in_the_weight_dtype_whatever_the_input_dtype(tiny, gemm_kind):
    """bf16 experts fed fp32 tokens: every expert GEMM (forward and backward) must be bf16 x bf16 — torch's CUTLASS
    grouped GEMM takes bf16 only and otherwise loops per expert in fp32 with the weights upcast (measured on an
    H200: 2/3 of a nano-full step). The output keeps the input's dtype and every LoRA factor gets a gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from medlora.model import apply_lora

    base, _ = tiny
    # r=8: torch's bf16 grouped GEMM needs 16-byte strides (the real runs use r=16)
    model = apply_lora(copy.deepcopy(base).to(torch.bfloat16), LoraArguments(lora_r=8, lora_alpha=16))
    experts = next(m for m in model.modules() if type(m).__name__ == "NemotronHMoE").experts
    lora = [p for n, p in experts.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)  # PEFT keeps adapters fp32 beside a bf16 base
    with torch.no_grad():
        for p in lora:
            p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(2)
    n_exp, top_k = model.config.n_routed_experts, model.config.num_experts_per_tok
    x = torch.randn(29, model.config.hidden_size, generator=g, requires_grad=True)
    index = torch.stack([torch.randperm(n_exp, generator=g)[:top_k] for _ in range(29)])
    weights = torch.rand(29, top_k, generator=g)
    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("_grouped_mm", "mm") and args[0].dim() >= 2:
                seen.append((func.overloadpacket.__name__, args[0].dtype, args[1].dtype))
            return func(*args, **(kwargs or {}))

    with Log():
        out = fast.grouped_lora_experts(experts, x, index, weights, gemm_kind)
        out.float().square().sum().backward()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert seen and all(a == b == torch.bfloat16 for _, a, b in seen), sorted(set(seen))
    assert all(p.grad is not None and p.grad.norm() > 0 for p in lora)


def test_lora_inputs_skip_the_fp32_round_trip_under_autocast_with_identical_results(tiny):
    """bf16 base + fp32 adapters under bf16 autocast (the GPU training setting): the fast forward lets PEFT's LoRA
    layers take the bf16 activations as they are (autocast casts them to bf16 for the GEMM anyway) — same loss and
    LoRA gradients bit for bit as with PEFT's cast to fp32, and fewer activation-sized copies."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from medlora.model import apply_lora

    base, _ = tiny
    model = apply_lora(copy.deepcopy(base).to(torch.bfloat16), LoraArguments(lora_r=8, lora_alpha=16))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    fast.enable(model, fast.DEFAULT_LEVERS, True)
    model.train()
    _, ids, mask, labels = batch([24, 17, 30])
    blocks = fast.backbone_of(model).layers
    assert sum(len(b._medlora_lora_layers) for b in blocks) > 0

    class CountCopies(TorchDispatchMode):
        copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "_to_copy" and args[0].numel() >= ids.numel() * 16:
                CountCopies.copies += 1
            return func(*args, **(kwargs or {}))

    results = []
    for keep_peft_cast in (True, False):
        original = fast.block_forward
        if keep_peft_cast:  # what PEFT does by itself: re-enable its cast after fast's block_forward chose
            def forced(block, *a, **k):
                for layer in block._medlora_lora_layers:
                    layer.cast_input_dtype_enabled = True
                block._saved, block._medlora_lora_layers = block._medlora_lora_layers, []
                try:
                    return original(block, *a, **k)
                finally:
                    block._medlora_lora_layers = block._saved
            fast.block_forward = forced
        CountCopies.copies = 0
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16), CountCopies():
                out, grads = run(model, input_ids=ids, attention_mask=mask, labels=labels)
        finally:
            fast.block_forward = original
        results.append((out.loss.detach(), grads, CountCopies.copies))
    (loss_cast, grads_cast, copies_cast), (loss, grads, copies) = results
    assert torch.equal(loss, loss_cast)
    assert grads.keys() == grads_cast.keys() and all(torch.equal(grads[n], grads_cast[n]) for n in grads)
    assert copies < copies_cast
    # put back after each block: a forward outside fast (no autocast) still casts as PEFT does
    assert all(layer.cast_input_dtype_enabled for b in blocks for layer in b._medlora_lora_layers)


KERNELS_SOURCE = '''
import triton
import triton.language as tl


@triton.autotune(configs=[triton.Config({"BLOCK": 16})], key=["seqlen"])
@triton.heuristics({"EVEN": lambda args: args["seqlen"] % 16 == 0})
@triton.heuristics({"H2": lambda args: True})
@triton.heuristics({"H3": lambda args: True})
@triton.heuristics({"H4": lambda args: True})
@triton.heuristics({"H5": lambda args: True})
@triton.jit  # six wrappers deep, as mamba_ssm's _layer_norm_bwd_kernel
def wrapped_kernel(x_ptr, seqlen, nchunks, BLOCK: tl.constexpr, EVEN: tl.constexpr, H2: tl.constexpr,
                   H3: tl.constexpr, H4: tl.constexpr, H5: tl.constexpr):
    pass


@triton.jit
def plain_kernel(x_ptr, nchunks, stride):
    pass


@triton.jit
def launched_kernel(x_ptr, nchunks):
    pass
'''


def test_unspecialize_takes_the_chunk_count_off_tritons_specialisation(tmp_path, monkeypatch):
    """mamba_ssm's SSD takes ceil(T / chunk) as `nchunks` (its norms ceil(T / SMs) as `rows_per_program`); Triton
    would build one more variant of each such kernel when it first turns a multiple of 16. Checked with Triton's
    own argument binder (the one a launch builds): after `unspecialize`, 144 and 137 chunks bind to the same
    specialisation; other arguments keep theirs; a kernel that has already launched is left alone (its binder
    exists)."""
    import importlib

    pytest.importorskip("triton")
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import create_function_from_signature

    (tmp_path / "medlora_test_kernels.py").write_text(KERNELS_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("medlora_test_kernels")

    def jit_of(kernel):
        while not hasattr(kernel, "params"):
            kernel = kernel.fn
        return kernel

    def binds(kernel, *args, **constexprs):
        fn = jit_of(kernel)
        return create_function_from_signature(fn.signature, fn.params, BaseBackend)(*args, **constexprs)[1]

    x = torch.zeros(4)
    assert binds(module.plain_kernel, x, 144, 64) != binds(module.plain_kernel, x, 137, 64)  # specialised today
    jit_of(module.launched_kernel).device_caches["launched"] = None
    assert fast.unspecialize([module]) == ["medlora_test_kernels.plain_kernel.nchunks",
                                           "medlora_test_kernels.wrapped_kernel.nchunks"]
    assert binds(module.plain_kernel, x, 144, 64) == binds(module.plain_kernel, x, 137, 64)
    assert binds(module.plain_kernel, x, 144, 64)[2] != binds(module.plain_kernel, x, 144, 63)[2]  # stride kept
    flags = dict(BLOCK=16, EVEN=True, H2=1, H3=1, H4=1, H5=1)
    wrapped = [binds(module.wrapped_kernel, x, 4096, n, **flags) for n in (144, 137)]
    assert wrapped[0] == wrapped[1]
    assert binds(module.wrapped_kernel, x, 4096, 144, **flags)[1] \
        != binds(module.wrapped_kernel, x, 4095, 144, **flags)[1]  # seqlen still specialised
    assert not jit_of(module.launched_kernel).params[1].do_not_specialize
