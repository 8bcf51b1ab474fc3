"""scripts/train_multigpu.py under torchrun with 2 CPU processes (gloo): DDP and FSDP2.

DDP: the same adapter on every rank. FSDP2 (`--fsdp2 true`): every block really sharded (half of
the weights per rank), the adapter written as one ordinary PEFT adapter that loads, and equal to
the DDP run's within fp32 round-off (same seed, same data, same global batch).
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def torchrun(out, tiny_cache, *extra):
    from medlora.benchmark import free_port  # a fixed port can still be held by an earlier run (TIME_WAIT)

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "scripts/train_multigpu.py", "--config", "configs/tiny.yaml", "--output_dir", str(out),
           "--max_steps", "6", "--eval_steps", "3", "--save_steps", "3", "--report_to", "none",
           "--tiny_cache_dir", str(tiny_cache), "--eval_accuracy_samples", "6", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def hf_ddp(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-hf")
    return root / "ddp", torchrun(root / "ddp", root / "tiny", "--backend", "hf")


def check_ddp(out, metrics, backend):
    assert metrics["world_size"] == 2 and metrics["backend"] == backend
    assert metrics["effective_batch_size"] == 2 * metrics["config"]["SFTConfig"]["per_device_train_batch_size"]
    checksums = metrics["adapter_sha256_by_rank"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_torchrun_two_processes_train_identical_adapters_hf(hf_ddp):
    check_ddp(*hf_ddp, "hf")


def test_torchrun_two_processes_train_identical_adapters_fast(tmp_path):
    """Backend fast under DDP, with the careful recipe on: the best checkpoint by accuracy (every rank loads the
    same one: the adapters stay identical) and the forgetting guard scored across both ranks."""
    metrics = torchrun(tmp_path / "ddp", tmp_path / "tiny", "--backend", "fast", "--metric_for_best_model",
                       "eval_accuracy", "--load_best_model_at_end", "true", "--early_stopping_patience", "5",
                       "--general_eval_data", "data/sample/general_mcq_sample.jsonl")
    check_ddp(tmp_path / "ddp", metrics, "fast")
    assert metrics["best_checkpoint"]["adapter_is_best"] and metrics["best_checkpoint"]["step"] in (3, 6)
    assert metrics["forgetting"]["n"] == 66 and metrics["forgetting"]["base_general_accuracy"] is not None


def test_fsdp2_shards_the_model_and_saves_the_same_adapter_as_ddp(hf_ddp, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ddp_out, ddp_metrics = hf_ddp
    out = tmp_path / "fsdp2"
    metrics = torchrun(out, tmp_path / "tiny", "--backend", "hf", "--fsdp2", "true")
    sharding = metrics["backend_report"]["sharding"]
    assert sharding["fsdp2"] and sharding["units"] > 2 and sharding["sharded_tensors"] == sharding["tensors"]
    assert 0.45 < sharding["local_fraction_rank0"] < 0.55  # rank 0 holds about half of every weight
    assert metrics["world_size"] == 2 and metrics["effective_batch_size"] == ddp_metrics["effective_batch_size"]
    assert abs(metrics["train_loss"] - ddp_metrics["train_loss"]) < 1e-4 * abs(ddp_metrics["train_loss"])

    fsdp_adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    ddp_adapter = load_file(ddp_out / "adapter" / "adapter_model.safetensors")
    assert set(fsdp_adapter) == set(ddp_adapter) and len(ddp_adapter) > 0
    for name, want in ddp_adapter.items():
        got = fsdp_adapter[name]
        assert got.shape == want.shape, name  # whole tensors, not one rank's shard
        assert (got - want).norm() <= 1e-5 * want.norm() + 1e-8, name
    assert any(t.abs().sum() > 0 for n, t in fsdp_adapter.items() if "lora_B" in n)  # it trained

    # an ordinary PEFT adapter: loads onto the base model and holds exactly the saved tensors
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    loaded = PeftModel.from_pretrained(base, out / "adapter")
    params = dict(loaded.named_parameters())
    for name, tensor in fsdp_adapter.items():
        key = name.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(params[key].detach(), tensor), name
    # checkpoints hold the adapter only (the optimizer state is sharded), and are committed
    checkpoint = out / "checkpoint-6"
    assert (checkpoint / "adapter_model.safetensors").exists() and (checkpoint / "medlora_complete.json").exists()
    assert not (checkpoint / "optimizer.pt").exists()
