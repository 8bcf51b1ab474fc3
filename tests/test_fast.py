"""Backend `fast` against the reference (transformers + PEFT) forward on the tiny Nemotron-H, on CPU in fp32.

Tolerances: fp32 on CPU, so the two paths differ only by summation order (SSD chunked vs HF's chunked
scan, grouped vs per-expert GEMMs): logits/loss within 1e-4 relative, every LoRA gradient within 1e-3
relative (norm of the difference over norm of the reference).
"""

import copy

import pytest
import torch

from medlora import fast
from medlora.config import LoraArguments

LOGIT_RTOL, GRAD_RTOL = 1e-4, 1e-3


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


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


def test_fast_falls_back_with_a_message_on_cpu(capsys):
    kernels, notes = fast.load_kernels(fast.LEVERS, "cpu")
    assert kernels.ssd is None and kernels.conv is None and kernels.varlen_attention is None
    assert any("no CUDA" in n for n in notes)
    assert any("lever compile is for GPUs" in n for n in notes) and kernels.route is fast.route
    with pytest.raises(Exception, match="unknown"):
        fast.load_kernels(("warp_drive",), "cpu")


def test_bench_runs_hf_and_fast_variants_and_reports_ratios(tmp_path):
    """`medlora bench` on CPU with the tiny model: per-backend batch sizes, lever variants, ratios in the JSON."""
    import json

    from conftest import SAMPLE, run_cli

    proc = run_cli(["bench", "--model_spec", "tiny", "--backends", "hf", "fast", "fast[none]",
                    "--backend_batch_size", "fast=8", "fast[none]=8", "--per_device_train_batch_size", "4",
                    "--bench_steps", "2", "--bench_warmup_steps", "1", "--rounds", "1", "--optim", "adamw_torch",
                    "--data_path", str(SAMPLE), "--results_dir", str(tmp_path / "results"),
                    "--model_cache_dir", str(tmp_path / "models")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    by = {r["backend"]: r for r in out["results"]}
    assert set(by) == {"hf", "fast", "fast[none]"}
    assert (by["hf"]["batch_size"], by["fast"]["batch_size"]) == (4, 8)
    assert by["hf"]["speedup_vs_hf"] == 1.0 and by["fast"]["speedup_vs_hf"] > 0
    assert by["fast[none]"]["backend_report"]["levers"] == []
    assert by["fast"]["backend_report"]["levers"] == list(fast.DEFAULT_LEVERS)  # the levers `train` runs
    assert "grouped" in by["fast"]["backend_report"]["kernels"]["moe_lora"]
    assert "PEFT" in by["fast[none]"]["backend_report"]["kernels"]["moe_lora"]
    assert out["versions"]["torch"] and "| fast |" in next((tmp_path / "results").glob("*.md")).read_text()


def test_bench_in_memory_builds_the_model_in_each_worker(tmp_path):
    """--in_memory (for nano-full, whose checkpoint does not fit the GPU machines' disk): nothing is saved."""
    import json

    from conftest import SAMPLE, run_cli

    proc = run_cli(["bench", "--model_spec", "tiny", "--in_memory", "true", "--backends", "hf", "fast",
                    "--backend_gradient_checkpointing", "fast=moe+mamba", "--profile", "true", "--nproc_per_node", "2",
                    "--per_device_train_batch_size", "4", "--bench_steps", "2", "--bench_warmup_steps", "1",
                    "--rounds", "1", "--optim", "adamw_torch", "--data_path", str(SAMPLE),
                    "--results_dir", str(tmp_path / "results"), "--model_cache_dir", str(tmp_path / "models")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    assert out["config"]["bench"]["in_memory"] is True and not (tmp_path / "models").exists()
    by = {r["backend"]: r for r in out["results"]}
    assert by["fast"]["trainable_params"] == by["hf"]["trainable_params"] > 0
    assert "built in memory" in by["hf"]["backend_report"]["model"] and by["fast"]["backend_report"]["levers"]
    # selective checkpointing reaches the fast forward; the profiled last step is reported, not timed
    assert by["fast"]["gradient_checkpointing"] == "moe+mamba"
    assert by["fast"]["backend_report"]["gradient_checkpointing"].endswith("moe+mamba")
    assert by["fast"]["step_s"]["n"] == 1 and by["fast"]["profile_last_step"][0]["ms"] > 0
    # two DDP processes per worker (gloo): a step counts both ranks' examples; per GPU = total / 2
    assert out["world_size"] == 2 and by["hf"]["world_size"] == 2
    for r in by.values():
        assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / 2, abs=0.1)
        # tokens and samples both count 2 x 4 examples per step: their ratio is a sample's length
        assert 0.7 < r["tokens_per_s"] / r["samples_per_s"] / r["mean_tokens_per_sample"] < 1.3


def test_bench_keeps_results_when_a_worker_fails(tmp_path, monkeypatch, capsys):
    """A crashed worker is recorded as failed, the JSON is still written, and the command exits 2 naming it."""
    import json
    import subprocess

    from conftest import SAMPLE
    from medlora.cli import main

    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda cmd, *a, **k: subprocess.CompletedProcess(cmd, 1)
                        if "--worker" in cmd else real_run(cmd, *a, **k))
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--model_spec", "tiny", "--backends", "hf", "fast", "--rounds", "1", "--data_path", str(SAMPLE),
              "--results_dir", str(tmp_path / "results"), "--model_cache_dir", str(tmp_path / "models")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "worker(s) for hf, fast failed" in err and "Traceback" not in err
    out = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    assert [(r["backend"], r["failed"], r["tokens_per_s"]) for r in out["results"]] == [("hf", True, None),
                                                                                       ("fast", True, None)]


def test_bench_loss_compares_lm_head_implementations(tmp_path, capsys):
    import json

    from medlora.cli import main

    main(["bench-loss", "--positions", "20", "120", "--step_tokens", "120", "--hidden_size", "32", "--vocab_size",
          "500", "--iters", "2", "--warmup", "1", "--results_dir", str(tmp_path)])
    out = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = {(r["positions"], r["impl"]): r for r in out["results"]}
    for positions in (20, 120):
        for impl in ("full_logits", "trl_chunked"):  # same maths in fp32 on CPU: equal to the reference
            r = rows[positions, impl]
            assert r["ms_median"] > 0 and r["loss_abs_diff_vs_fp32"] < 1e-5 and r["grad_rel_diff_vs_fp32"] < 1e-5
        assert "needs CUDA" in rows[positions, "cce"]["skipped"] and "needs CUDA" in rows[positions, "liger"]["skipped"]
    assert out["versions"]["trl"] and "| 20 | trl_chunked |" in next(tmp_path.glob("*.md")).read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["bench-loss", "--positions", "500", "--step_tokens", "100", "--results_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "--positions" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--backends", "fast[warp]"], "unknown levers"),
    (["--backends", "turbo"], "unknown backend"),
    (["--backends", "hf", "--backend_batch_size", "hf:4"], "is not backend=value"),
    (["--backends", "hf+triton"], "needs an NVIDIA GPU"),
    (["--backends", "hf", "--backend_gradient_checkpointing", "hf=moe"], "are for fast backends"),
    (["--backends", "fast", "--backend_gradient_checkpointing", "fast=ffn"], "bad value"),
    (["--backends", "hf", "--in_memory", "true", "--model_spec", "nano-huge"], "--model_spec"),
])
def test_bench_refuses_bad_backend_options(args, message, capsys):
    from conftest import SAMPLE
    from medlora.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--model_spec", "tiny", "--data_path", str(SAMPLE), *args])  # no ../shared needed
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err


def test_train_cli_fast_with_packing_and_hf_refuses_it(tmp_path):
    import json

    from conftest import run_cli

    common = ["train", "--config", "configs/tiny.yaml", "--max_steps", "3", "--report_to", "none",
              "--tiny_cache_dir", str(tmp_path / "tiny"), "--packing", "true", "--eval_accuracy_samples", "4"]
    refused = run_cli([*common, "--output_dir", str(tmp_path / "hf")])
    assert refused.returncode == 2 and "--backend fast" in refused.stderr and "Traceback" not in refused.stderr
    ok = run_cli([*common, "--backend", "fast", "--output_dir", str(tmp_path / "fast")])
    assert ok.returncode == 0, ok.stderr[-3000:]
    metrics = json.loads((tmp_path / "fast" / "metrics.json").read_text())
    assert metrics["backend"] == "fast" and metrics["config"]["SFTConfig"]["packing"] is True
    assert metrics["audits"]["gradients"]["lora_tensors"] > 0


def test_check_packed_notices_a_lost_or_altered_example():
    from medlora.config import MedloraError
    from medlora.train import check_packed

    examples = [{"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]}, {"input_ids": [8, 9], "completion_mask": [0, 1]}]
    good = [{"input_ids": [8, 9, 5, 6, 7], "labels": [-100, 9, -100, 6, 7], "seq_lengths": [2, 3]}]
    check_packed(good, examples)
    altered = [{"input_ids": [8, 9, 5, 6, 7], "labels": [-100, 9, -100, -100, 7], "seq_lengths": [2, 3]}]
    with pytest.raises(MedloraError, match="1 of 2 examples missing or altered"):
        check_packed(altered, examples)
    with pytest.raises(MedloraError, match="missing"):
        check_packed([{"input_ids": [8, 9], "labels": [-100, 9], "seq_lengths": [2]}], examples)
