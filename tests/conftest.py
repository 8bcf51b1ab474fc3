import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DEV = ROOT.parent / "shared" / "data" / "medmcqa"
SAMPLE = ROOT / "data" / "sample" / "medmcqa_sample.jsonl"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from medlora.model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-nemotron-h")


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from medlora.config import ModelArguments
    from medlora.model import load_model

    model, tokenizer = load_model(ModelArguments(model_name_or_path=str(tiny_dir)))
    return model, tokenizer


@pytest.fixture
def dev_path():
    path = SHARED_DEV / "dev_cop0.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present (the real MedMCQA dev split lives outside the repository)")
    return path


def run_cli(args, cwd=ROOT, timeout=900, env=None):
    import subprocess

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "medlora.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
