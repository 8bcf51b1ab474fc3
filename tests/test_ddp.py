"""scripts/train_multigpu.py under torchrun with 2 CPU processes (gloo): same adapter on every rank."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("backend, port", [("hf", 29517), ("fast", 29518)])
def test_torchrun_two_processes_train_identical_adapters(tmp_path, backend, port):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "scripts/train_multigpu.py", "--config", "configs/tiny.yaml", "--output_dir", str(out),
           "--max_steps", "6", "--eval_steps", "3", "--save_steps", "3", "--report_to", "none",
           "--tiny_cache_dir", str(tmp_path / "tiny"), "--eval_accuracy_samples", "6", "--backend", backend]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["backend"] == backend
    assert metrics["effective_batch_size"] == 2 * metrics["config"]["SFTConfig"]["per_device_train_batch_size"]
    checksums = metrics["adapter_sha256_by_rank"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
