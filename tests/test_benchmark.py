"""`medlora bench` on CPU: workers, result files, refusals, the trainer it times (train's), and its reports."""

import pytest

from medlora import fast


def test_bench_runs_hf_and_fast_variants_and_reports_ratios(tmp_path):
    """`medlora bench` on CPU with the tiny model: per-backend batch sizes, lever variants, ratios in the JSON."""
    import json

    from conftest import SAMPLE, run_cli

    proc = run_cli(["bench", "--model_spec", "tiny", "--backends", "hf", "fast", "fast[none]", "fast+nf4",
                    "--backend_batch_size", "fast=8", "fast[none]=8", "fast+nf4=26",
                    "--per_device_train_batch_size", "4",
                    "--bench_steps", "2", "--bench_warmup_steps", "1", "--rounds", "1", "--optim", "adamw_torch",
                    "--data_path", str(SAMPLE), "--results_dir", str(tmp_path / "results"),
                    "--model_cache_dir", str(tmp_path / "models"), "--include_explanation", "true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    by = {r["backend"]: r for r in out["results"]}
    assert set(by) == {"hf", "fast", "fast[none]", "fast+nf4"}
    # SDPA's cuDNN backend as `train` runs it: off for hf (a plan per new length), torch's default (on) for fast
    assert {b: r["sdpa_cudnn"] for b, r in by.items()} == {"hf": False, "fast": True, "fast[none]": True,
                                                           "fast+nf4": True}
    # the 4-bit row (loaded from the saved model, as a checkpoint is): same LoRA, its experts in NF4, said so
    assert by["fast+nf4"]["trainable_params"] == by["fast"]["trainable_params"] > 0
    quantization = by["fast+nf4"]["backend_report"]["quantization"]
    assert quantization["nf4_expert_layers"] > 0 and quantization["parameters_by_dtype"]["nf4 (routed experts)"] > 0
    assert "quantization" not in by["fast"]["backend_report"]
    # where the memory goes, counted from the tensors: NF4 experts take 0.14x their fp32 bytes; LoRA is the same
    nf4_mem, bf_mem = by["fast+nf4"]["memory_breakdown"], by["fast"]["memory_breakdown"]
    assert nf4_mem["lora_gib"] == bf_mem["lora_gib"] == bf_mem["lora_grads_gib"] > 0 and bf_mem["optimizer_gib"] > 0
    assert bf_mem["weights_gib"] > nf4_mem["weights_gib"] > 0.3 * bf_mem["weights_gib"]  # tiny: experts are a minority
    assert out["config"]["bench"]["include_explanation"] is True  # the longer samples of the real recipe
    assert by["hf"]["mean_tokens_per_sample"] > 1.5 * _mean_tokens_without_explanation(tmp_path / "models", 8)
    assert (by["hf"]["batch_size"], by["fast"]["batch_size"]) == (4, 8)
    # 3 steps of 26 from the 72-question sample: the last batch repeats examples, and the JSON says how many
    assert by["fast+nf4"]["examples_reused"] == 3 * 26 - 72 and by["fast"]["examples_reused"] == 0
    assert "are used a second time" in proc.stdout
    assert by["hf"]["speedup_vs_hf"] == 1.0 and by["fast"]["speedup_vs_hf"] > 0
    assert by["fast[none]"]["backend_report"]["levers"] == []
    assert by["fast"]["backend_report"]["levers"] == list(fast.DEFAULT_LEVERS)  # the levers `train` runs
    assert "grouped" in by["fast"]["backend_report"]["kernels"]["moe_lora"]
    assert "PEFT" in by["fast[none]"]["backend_report"]["kernels"]["moe_lora"]
    assert out["versions"]["torch"] and "| fast |" in next((tmp_path / "results").glob("*.md")).read_text()
    step = by["fast"]["step_s"]
    assert step["min"] <= step["median"] <= step["max"] and step["min"] <= step["mean"] <= step["max"]
    assert step["slowest"]["s"] == step["max"] and step["slowest"]["tokens"] > 0
    # every timed step is kept, with its tokens, so an outlier can be traced afterwards
    assert len(by["fast"]["steps"]) == step["n"] and max(x["s"] for x in by["fast"]["steps"]) == step["max"]
    assert all(x["padded_tokens"] >= x["tokens"] > 0 for x in by["fast"]["steps"])
    # and what can make a step slow, per step: collector pauses, new CUDA segments (none on a CPU); the model and
    # data are frozen out of the collector's reach while training (a full collection would walk them)
    assert all(x["gc_s"] >= 0 and len(x["gc_collections"]) == 3 and x["cuda_mallocs"] == 0
               and x["gc_frozen_objects"] > 10_000 and x["triton_compiles"] == x["triton_autotunes"] == 0
               and x["torch_compiles"] == 0 for x in by["fast"]["steps"])  # `compile` is not a default lever
    assert step["max_over_median"] == pytest.approx(step["max"] / step["median"], abs=2e-3)  # from unrounded times
    assert by["fast"]["warmup_triton_compiles"] == by["fast"]["warmup_triton_autotunes"] == [0]  # CPU: references
    assert by["fast"]["warmup_torch_compiles"] == [0]
    assert set(out["flops_formulas"]) == {"lora", "6n"}
    assert 0 < by["fast"]["flops_per_token_lora"] < by["fast"]["flops_per_token"]


def _mean_tokens_without_explanation(cache, n):
    import statistics

    from conftest import SAMPLE
    from transformers import AutoTokenizer

    from medlora.data import load_medmcqa, tokenize_rows
    from medlora.formatting import FormatOptions

    tokenizer = AutoTokenizer.from_pretrained(next(p.parent for p in cache.rglob("tokenizer.json")))
    rows, _ = load_medmcqa(str(SAMPLE), evaluation=True)
    dataset, _ = tokenize_rows(rows[:n], tokenizer, FormatOptions("plain"), 1024, "x")
    return statistics.fmean(len(ids) for ids in dataset["input_ids"])


def test_bench_in_memory_builds_the_model_in_each_worker(tmp_path):
    """--in_memory (for nano-full, whose checkpoint does not fit the GPU machines' disk): nothing is saved."""
    import json

    from conftest import SAMPLE, run_cli

    proc = run_cli(["bench", "--model_spec", "tiny", "--in_memory", "true", "--backends", "hf", "fast",
                    "--backend_gradient_checkpointing", "fast=moe+mamba", "--profile", "true", "--profile_step", "1",
                    "--nproc_per_node", "2", "--sdpa_cudnn", "false",
                    "--per_device_train_batch_size", "4", "--bench_steps", "2", "--bench_warmup_steps", "1",
                    "--rounds", "1", "--optim", "adamw_torch", "--data_path", str(SAMPLE),
                    "--results_dir", str(tmp_path / "results"), "--model_cache_dir", str(tmp_path / "models")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    assert out["config"]["bench"]["in_memory"] is True and not (tmp_path / "models").exists()
    by = {r["backend"]: r for r in out["results"]}
    assert by["fast"]["trainable_params"] == by["hf"]["trainable_params"] > 0
    assert "built in memory" in by["hf"]["backend_report"]["model"] and by["fast"]["backend_report"]["levers"]
    # --sdpa_cudnn false reached every worker, fast's too (its default is on); the cuDNN version is recorded
    assert [r["sdpa_cudnn"] for r in by.values()] == [False, False] and "cudnn" in out["versions"]
    # selective checkpointing reaches the fast forward; the profiled step (the first timed one, --profile_step 1:
    # step 2 after one warm-up step) is reported, not timed
    assert by["fast"]["gradient_checkpointing"] == "moe+mamba"
    assert by["fast"]["backend_report"]["gradient_checkpointing"].endswith("moe+mamba")
    assert by["fast"]["step_s"]["n"] == 1 and by["fast"]["profile_top_kernels"][0]["ms"] > 0
    assert by["fast"]["profiled_step"] == 2 and [s["step"] for s in by["fast"]["steps"]] == [3]
    # the breakdown names where an op's calls come from: the grouped GEMMs of the routed experts, in the forward
    # (labelled block), and in the backward (autograd node); on CPU in fp32 each call loops (child ops)
    breakdown = by["fast"]["profile_breakdown"]
    assert breakdown["aten_ops"] > 1000 and breakdown["wall_s"] > 0
    origins = {o["origin"]: o for o in breakdown["callers"]["aten::_grouped_mm"]["from"]}
    assert "medlora.moe.routed_experts" in origins and any("GroupedMmBackward0" in o for o in origins)
    assert origins["medlora.moe.routed_experts"]["children_per_call"] > 1
    assert all("[" in shape for o in origins.values() for shape in o["shapes"])
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


def test_bench_trains_with_the_sft_config_that_train_builds(tmp_path):
    """Same arguments, same SFTConfig: the bench applies train's rules through the same builder (only the output
    directories differ), for every kind of backend."""
    from medlora.backends import Backend
    from medlora.benchmark import BenchArguments, bench_sft_config
    from medlora.config import parse_config, training_sections
    from medlora.trainer import build_sft_config

    args = BenchArguments(bench_steps=5, bench_warmup_steps=2, learning_rate=3e-4, max_length=512, seed=7)
    for spec, checkpointing in (("hf", True), ("fast", True), ("fast[triton_mamba]@sm80", False), ("hf+triton", True)):
        backend = Backend.parse(spec)
        bench = bench_sft_config(args, backend, 16, checkpointing, str(tmp_path / "bench"))
        flags = ["--output_dir", str(tmp_path / "train"), "--max_steps", "7", "--per_device_train_batch_size", "16",
                 "--gradient_accumulation_steps", "1", "--learning_rate", "3e-4", "--lr_scheduler_type", "constant",
                 "--warmup_steps", "0", "--gradient_checkpointing", str(checkpointing).lower(), "--optim",
                 args.optim, "--max_length", "512", "--report_to", "none", "--save_strategy", "no",
                 "--eval_strategy", "no", "--logging_steps", "10000", "--train_sampling_strategy", "sequential",
                 "--dataloader_num_workers", "0", "--seed", "7", "--disable_tqdm", "true"]
        *_, train_args = parse_config(flags, training_sections())
        train = build_sft_config(train_args, backend, say=lambda *_: None)

        def comparable(config):
            data = config.to_dict()
            return {k: v for k, v in data.items() if k not in ("output_dir", "logging_dir")}

        assert comparable(bench) == comparable(train), spec
        assert bench.completion_only_loss is True
        assert bench.gradient_checkpointing == (checkpointing and not backend.checkpoints_itself)
        assert bench.gradient_checkpointing_kwargs in (None, {"use_reentrant": False})
    assert train is not train_args  # a copy: the caller's object is left as given


def test_backends_are_parsed_once_into_one_object():
    from medlora.backends import Backend
    from medlora.config import RunArguments
    from medlora.errors import ConfigError

    assert Backend.parse("fast") == Backend("fast", fast.DEFAULT_LEVERS)  # what `train --backend fast` runs
    no_norms = Backend.parse("fast[-triton_norms]")  # a lever table's "each off alone" row
    assert no_norms.levers == tuple(lv for lv in fast.DEFAULT_LEVERS if lv != "triton_norms") and no_norms.levers
    assert Backend.parse("fast[-triton_norms-varlen_attention]").levers == ("triton_mamba", "grouped_lora_moe",
                                                                           "fused_moe", "stream_padding")
    assert "stream_padding" not in Backend.parse("fast[-stream_padding]").levers  # its A/B row
    assert Backend.parse("fast[none]").levers == () and Backend.parse("fast[compile]@sm80").gpu_arch == "sm80"
    plus = Backend.parse("fast[+offload_checkpoints+compile_blocks+triton_norms]")  # the defaults and opt-in ones
    assert plus.levers == fast.DEFAULT_LEVERS + ("offload_checkpoints", "compile_blocks")
    hf_triton = Backend.parse("hf+triton")
    assert hf_triton.is_plain_hf and hf_triton.triton_mamba_ops and hf_triton.needs_cuda
    assert not hf_triton.supports_fsdp2 and Backend.parse("hf").supports_fsdp2
    assert Backend.parse("unsloth").checkpoints_itself and Backend.parse("fast").keeps_sequence_boundaries
    run = RunArguments(backend="fast", fast_levers=["triton_mamba"], fast_gpu_arch="sm80")
    assert Backend.from_run(run) == Backend("fast", ("triton_mamba",), "sm80")
    assert Backend.from_run(RunArguments(backend="hf", fast_levers=["compile"])) == Backend("hf")
    # +nf4: the 4-bit experts of --load_in_4bit, for a bench row beside bf16 fast
    assert Backend.parse("fast+nf4") == Backend("fast", fast.DEFAULT_LEVERS, nf4_experts=True)
    assert Backend.parse("fast[triton_mamba]+nf4@sm80") == Backend("fast", ("triton_mamba",), "sm80", nf4_experts=True)
    for bad in ("fast@sm70", "hf@sm80", "fast[warp]", "fast[-warp]", "fast[+warp]", "jax", "hf+nf4", "unsloth+nf4", "fast+nf4+nf4"):
        with pytest.raises(ConfigError):
            Backend.parse(bad)


def test_the_profiled_step_is_left_out_of_the_timing_wherever_it_falls():
    """A worker's record: 2 warm-up steps, then 4 steps of which one was profiled (the last, the default, or one
    picked with --profile_step): the other three count, each with its own tokens, and keep their step numbers."""
    from medlora.benchmark import summarise_backend, timed_steps

    def worker(profiled):
        return {"backend": "fast", "timed_from_step": 2, "profiled_step": profiled,
                "step_times": [9.0, 9.0, 1.0, 2.0, 4.0, 8.0], "step_causes": [{"gc_s": i} for i in range(6)],
                "tokens_per_step": [(10, 5, 16), (20, 10, 32), (40, 20, 64), (80, 40, 128)],
                "world_size": 1, "flops_per_token": 1.0, "flops_per_token_lora": 1.0, "mean_tokens_per_sample": 5.0,
                "peak_mem_gib": 1.0, "trainable_params": 1, "params": {}, "load_s": 0.0,
                "gradient_checkpointing": True, "backend_report": {}, "profile_top_kernels": [{"ms": 1.0}],
                "profile_breakdown": {}}

    for profiled, kept in ((5, [2, 3, 4]), (3, [2, 4, 5]), (None, [2, 3, 4, 5])):
        run = worker(profiled)
        steps = timed_steps([run])
        assert [s["step"] for s in steps] == [i + 1 for i in kept]
        assert [(s["s"], s["tokens"], s["gc_s"]) for s in steps] == [
            (run["step_times"][i], run["tokens_per_step"][i - 2][0], i) for i in kept]
        summary = summarise_backend([run], batch=2, gpu=None)
        times = [run["step_times"][i] for i in kept]
        assert summary["step_s"]["n"] == len(kept) and summary["step_s"]["max"] == max(times)
        assert summary["tokens_per_s"] == round(sum(run["tokens_per_step"][i - 2][0] for i in kept) / sum(times), 1)
        assert summary.get("profiled_step") == (None if profiled is None else profiled + 1)


def test_bench_report_reads_bench_results_only_and_compares_each_model_and_gpu(tmp_path):
    import json
    import shutil

    from conftest import ROOT
    from medlora.bench_report import best_settings, lever_table, load_results, results_table, summary_lines

    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        shutil.copy(path, tmp_path)
    (tmp_path / "2026-12-01-h200-rehearsal-x.json").write_text(json.dumps({"kind": "rehearsal", "commands": {}}))
    results = load_results(tmp_path)
    assert results and all("rehearsal" not in name for name in results)
    table = results_table(results)
    assert {"tokens_per_s", "epoch_hours_medmcqa_train", "family", "levers"} <= set(table.columns)
    best = best_settings(table)
    assert not best.duplicated(["model", "gpu", "family"]).any()  # one best row per backend family and group
    for (model, gpu, fam), row in best.set_index(["model", "gpu", "family"]).iterrows():
        same = table[(table.model == model) & (table.gpu == gpu) & (table.family == fam) & ~table.oom & ~table.failed]
        assert row.tokens_per_s == same.tokens_per_s.max()
    full = best[(best.model == "nano-full") & (best.family == "fast")].iloc[0]
    assert full.vs_hf > 10 and full.vs_unsloth > 10
    assert any(line.startswith("nano-full on H200:") and "fast = " in line for line in summary_lines(best))
    assert set(lever_table(table)["model"]) >= {"nano-quarter", "nano-full"}


def test_flops_per_token_counts_what_a_lora_step_computes(tiny):
    """By hand on the tiny model: N_active (routed experts x top_k/E, no input embeddings), the LoRA factors
    likewise, then 4N + 6N_lora + attention (LoRA) and 6N + attention (full fine-tuning convention)."""
    import copy

    from medlora.benchmark import active_params, flops_per_token
    from medlora.config import LoraArguments
    from medlora.model import apply_lora

    model = apply_lora(copy.deepcopy(tiny[0]), LoraArguments(lora_r=4))
    config = model.config
    share = config.num_experts_per_tok / config.n_routed_experts
    active = lora = 0.0
    for name, p in model.named_parameters():
        routed = ".experts." in name and "shared_experts" not in name
        if "lora_" in name:
            lora += p.numel() * (share if routed else 1)
        elif "embeddings" not in name:
            active += p.numel() * (share if routed and p.dim() == 3 else 1)
    counted = active_params(model)
    assert abs(counted["active"] - active) <= 64 and abs(counted["lora_active"] - lora) <= 64  # integer division
    assert lora > 0 and counted["total"] > counted["active"]
    attention = 12 * sum(t == "full_attention" for t in config.layers_block_type) * (
        config.num_attention_heads * config.head_dim) * 100
    assert flops_per_token(model, 100) == 6 * counted["active"] + attention
    assert flops_per_token(model, 100, "lora") == 4 * counted["active"] + 6 * counted["lora_active"] + attention


class _Event:
    """The parts of a torch profiler FunctionEvent that `device_idle` reads."""

    def __init__(self, name, kind, start, end, parent=None):
        import types

        self.name, self.cpu_parent = name, parent
        self.device_type = types.SimpleNamespace(name=kind)
        self.time_range = types.SimpleNamespace(start=start, end=end)


def test_device_idle_blames_each_gap_on_a_sync_or_on_the_host():
    from medlora.benchmark import device_idle

    block = _Event("medlora.moe", "CPU", 0, 1000)
    count = _Event("aten::bincount", "CPU", 100, 400, block)
    events = [block, count, _Event("cudaStreamSynchronize", "CPU", 110, 300, count),
              _Event("aten::mm", "CPU", 500, 520, block)]
    # device: busy 0-300, idle 300-600 (the sync ended at 300: drained), busy 600-700, idle 700-705 (below the
    # threshold), busy 705-800, idle 800-900 (no sync: the host was late with aten::mm's launch at 850)
    events += [_Event("kernel", "CUDA", 0, 300), _Event("kernel", "CUDA", 600, 700), _Event("kernel", "CUDA", 705, 800),
               _Event("kernel", "CUDA", 900, 950)]
    events.append(_Event("aten::add", "CPU", 850, 860, block))
    idle = device_idle(events, step_s=0.00125, gap_us=20.0)
    assert idle["gaps"] == 2 and idle["idle_ms"] == pytest.approx(0.4)
    assert idle["idle_after_sync_ms"] == pytest.approx(0.3)
    causes = idle["idle_by_cause_ms"]
    assert causes == {"after sync: medlora.moe / aten::bincount / cudaStreamSynchronize": pytest.approx(0.3),
                      "host: medlora.moe / aten::add": pytest.approx(0.1)}
    assert idle["host_syncs"] == {"medlora.moe / aten::bincount / cudaStreamSynchronize": 1}
    assert idle["largest_gaps"][0]["ms"] == pytest.approx(0.3)
    assert idle["outside_first_to_last_kernel_ms"] == pytest.approx(0.3)  # 1.25 ms step, kernels span 0.95
    assert device_idle([e for e in events if e.device_type.name == "CPU"], 0.001) == {}  # CPU-only profile


def test_step_causes_count_collector_pauses_per_step():
    import gc

    from medlora.benchmark import StepCauses

    causes = StepCauses()
    with causes:
        causes.begin()
        quiet = causes.end()
        causes.begin()
        gc.collect()
        collected = causes.end()
    assert quiet["gc_collections"] == [0, 0, 0] or quiet["gc_s"] < 0.05  # a background collection may land
    assert collected["gc_collections"][2] >= 1 and collected["gc_s"] > 0
    assert collected["cuda_mallocs"] == collected["alloc_retries"] == 0
    assert quiet["triton_compiles"] == collected["triton_compiles"] == 0
    assert causes._gc not in gc.callbacks  # removed on exit


def test_step_causes_count_torch_compiles_and_triton_autotuning_per_step(monkeypatch):
    """A torch.compile'd function compiles on its first call and again on a new shape (dynamo's recompile);
    a Triton autotuner tunes once per new key (no GPU here: its `run` is replaced by one that fills the cache as
    Autotuner.run does, and StepCauses wraps whatever `run` is there). Both are put back on exit."""
    from types import SimpleNamespace

    import torch
    from torch._dynamo import callback_handler

    from medlora.benchmark import StepCauses

    autotuner = pytest.importorskip("triton.runtime.autotuner").Autotuner

    def fake_run(tuner, *args, key):
        tuner.cache.setdefault(key, "best config")

    monkeypatch.setattr(autotuner, "run", fake_run)
    tuner = object.__new__(autotuner)
    tuner.cache, tuner.base_fn = {}, SimpleNamespace(__name__="_chunk_scan_fwd_kernel")
    double = torch.compile(lambda x: x.sin() * 2, backend="eager")
    steps = []
    with StepCauses() as causes:
        for length, key in ((3, 64), (3, 64), (5, 64), (5, 128)):
            causes.begin()
            double(torch.randn(length))
            tuner.run(key=key)
            steps.append(causes.end())
    assert [s["torch_compiles"] for s in steps] == [1, 0, 1, 0]
    assert steps[0]["torch_compile_triggers"] == ["dynamo"] and steps[0]["torch_compile_s"] > 0
    assert [s["triton_autotunes"] for s in steps] == [1, 0, 0, 1]
    assert steps[3]["triton_autotuned"] == ["_chunk_scan_fwd_kernel"] and steps[1]["triton_autotuned"] == []
    assert autotuner.run is fake_run and causes._dynamo_start not in callback_handler.start_callbacks  # put back
    tuner.run(key=256)  # outside: not counted
    assert len(causes.autotunes) == 2


def test_step_causes_count_triton_compiles_and_keep_other_hooks():
    """Triton calls jit_cache_hook before and jit_post_compile_hook after every in-process build of a kernel
    variant (no GPU here, so the hooks are called as Triton's JITFunction._call_hook calls them): each step
    counts its own builds, a hook installed before the bench still runs and may still skip a compile, and the
    hooks are put back on exit."""
    from types import SimpleNamespace

    from medlora.benchmark import StepCauses

    knobs = pytest.importorskip("triton").knobs
    seen = []
    theirs = (lambda **h: seen.append(("cache", h["fn"].name)) or False,
              lambda **h: seen.append(("post", h["fn"].name)))
    saved = knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = theirs
    try:
        def build(name):  # what JITFunction._do_compile does around a compile
            info = dict(key="k", repr=name, fn=SimpleNamespace(name=name), compile={}, is_manual_warmup=False,
                        already_compiled=False)
            if not knobs.runtime.jit_cache_hook(**info):
                knobs.runtime.jit_post_compile_hook(**info)

        with StepCauses() as causes:
            causes.begin()
            quiet = causes.end()
            causes.begin()
            build("_relu2_fwd")
            build("_chunk_scan_fwd_kernel")
            build("_relu2_fwd")
            busy = causes.end()
            causes.begin()
            step3 = causes.end()
        assert quiet["triton_compiles"] == step3["triton_compiles"] == 0 and step3["triton_kernels"] == []
        assert busy["triton_compiles"] == 3 and busy["triton_compile_s"] >= 0
        assert busy["triton_kernels"] == ["_chunk_scan_fwd_kernel", "_relu2_fwd"]
        assert seen == [("cache", "_relu2_fwd"), ("post", "_relu2_fwd"), ("cache", "_chunk_scan_fwd_kernel"),
                        ("post", "_chunk_scan_fwd_kernel"), ("cache", "_relu2_fwd"), ("post", "_relu2_fwd")]
        assert (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook) == theirs  # put back
    finally:
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = saved


def test_the_gpu_bench_script_passes_flags_the_bench_accepts(tmp_path, monkeypatch):
    """benchmarks/nano-full-h200.sh (the runs behind README's tables) runs each phase; with MEDLORA and PYTEST set
    to a recorder, every bench call it makes is parsed and validated by `medlora bench`'s own sections, and every
    backend it names parses; its two test phases select every GPU equivalence test between them; a checkpointing
    setting that fails (out of memory) does not stop the others. An unknown phase is refused."""
    import json
    import os
    import re
    import subprocess
    import sys

    from conftest import ROOT
    from medlora.backend import Backend
    from medlora.cli import COMMANDS
    from medlora.config import parse_config

    calls = tmp_path / "calls.jsonl"
    recorder = tmp_path / "record"
    recorder.write_text(f"#!{sys.executable}\nimport json, sys\n"
                        f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                        "sys.exit(2 if 'fast=false' in sys.argv else 0)\n")  # as an out-of-memory bench exits
    recorder.chmod(0o755)
    env = {**os.environ, "MEDLORA": f"{recorder} medlora", "PYTEST": f"{recorder} pytest",
           "PYTHON": f"{recorder} python", "RESULTS": str(tmp_path / "results")}
    script = (ROOT / "benchmarks" / "nano-full-h200.sh").read_text()
    phases = re.findall(r"^    ([a-z][a-z-]*)\)", script, re.M)  # every phase the script has, in its order
    assert {"fast", "ab", "checkpointing", "quarter", "gpu-tests", "gpu-tests-nano"} <= set(phases)
    # the two test phases call pytest, sdpa-first-call a script; checkpointing runs four benches, sdpa-cudnn-* two
    benches = len(phases) - 3 + 3 + 1 + 1
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "nano-full-h200.sh"), *phases], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "checkpointing false: bench exited 2" in proc.stderr
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    assert sorted(argv[0] for argv in recorded) == ["medlora"] * benches + ["pytest"] * 2 + ["python"]
    pytest_calls = [argv for argv in recorded if argv[0] == "pytest"]
    script_call = next(argv for argv in recorded if argv[0] == "python")
    assert (ROOT / script_call[1]).is_file() and script_call[2:] == ["--results_dir", str(tmp_path / "results")]
    # off a GPU the script says so and exits non-zero, writing nothing: what it measures needs CUDA
    refused = subprocess.run([sys.executable, script_call[1], "--results_dir", str(tmp_path / "sdpa")], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "NVIDIA GPU" in refused.stderr and not (tmp_path / "sdpa").exists()
    recorded = [argv for argv in recorded if argv[0] == "medlora"]
    tags, backends = [], set()
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # validated as on the GPU machine
    for argv in recorded:
        assert argv[1] == "bench"
        bench, _ = parse_config(argv[2:], COMMANDS["bench"].sections(), "medlora bench")
        bench.validate()
        assert all(Backend.parse(spec) for spec in bench.backends) and bench.results_dir == str(tmp_path / "results")
        tags.append(bench.tag)
        backends |= set(bench.backends)
    assert len(set(tags)) == benches  # one result file name per run
    assert {f"fast[-{lever}]" for lever in fast.DEFAULT_LEVERS} <= backends  # every default lever gets its row
    opt_in = set(fast.LEVERS) - set(fast.DEFAULT_LEVERS) - {"compile"}  # compile: its own A/B (README)
    assert {f"fast[+{lever}]" for lever in opt_in} <= backends  # and every opt-in lever
    assert {argv[argv.index("--backend_gradient_checkpointing") + 1] for argv in recorded
            if "--backend_gradient_checkpointing" in argv} == {"fast=true", "fast=moe", "fast=mamba", "fast=false"}
    assert {argv[argv.index("--sdpa_cudnn") + 1] for argv in recorded if "--sdpa_cudnn" in argv} == {"true", "false"}
    selected = []
    for argv in pytest_calls:
        options = argv[argv.index("--durations=0") + 1:]
        listing = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                  *options], cwd=ROOT, capture_output=True, text=True, timeout=120)
        selected.append({line for line in listing.stdout.splitlines() if "::" in line})
        assert selected[-1], listing.stdout + listing.stderr
    names = re.findall(r"^def (test_\w+)", (ROOT / "tests" / "test_gpu_fast.py").read_text(), re.M)
    ran = [{test.split("::")[1].split("[")[0] for test in tests if "test_gpu_fast.py" in test} for tests in selected]
    assert len(names) >= 7 and set(names) == ran[0] | ran[1] and not ran[0] & ran[1]  # each test once
    assert any("test_tiny_train_and_eval_bf16[fast-True]" in test for test in selected[0])
    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "nano-full-h200.sh"), "fastest"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown phase fastest" in bad.stderr


def test_versions_record_the_cudnn_build_and_an_unusable_one_without_raising(monkeypatch):
    """Every run records cuDNN: its version, None where torch has none, and the reason where torch refuses it
    (a cuDNN that does not fit the GPUs): recording versions never stops a run."""
    import torch

    from medlora import runinfo

    assert runinfo.versions()["cudnn"] == (torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
                                           else None)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: False)
    assert runinfo.versions()["cudnn"] is None
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)

    def refused():
        raise RuntimeError("cuDNN version 91900 is not compatible with devices with SM < 7.5. " + "x" * 500)

    monkeypatch.setattr(torch.backends.cudnn, "version", refused)
    recorded = runinfo.versions()
    assert recorded["cudnn"].startswith("unusable: cuDNN version 91900") and len(recorded["cudnn"]) < 200
    assert recorded["torch"] and "git_commit" in recorded  # the rest is still recorded
