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


@pytest.fixture(scope="session")
def base_trap_dir(tiny_dir, tmp_path_factory):
    """The tiny model dressed as the Nemotron-3 Base checkpoint: its tokenizer declares eos <|im_end|>, whose
    input-embedding and LM-head rows are all zero (never trained); </s> is the trained document separator."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("trap") / "tiny-base-trap"
    shutil.copytree(tiny_dir, out)
    (out / "medlora_model.json").unlink()  # not the tiny build any more
    tok = AutoTokenizer.from_pretrained(out)
    tok.eos_token = "<|im_end|>"
    tok.save_pretrained(out)
    weights = load_file(out / "model.safetensors")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for name in ("backbone.embeddings.weight", "lm_head.weight"):
        weights[name][im_end] = 0
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def bos_tokenizer(tiny):
    """The tiny tokenizer with a post-processor that prepends <s>, as many tokenizers (Llama's) do by default."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(tiny[1])
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.bos_token_id)])
    assert tok.encode("a")[0] == tok.bos_token_id
    return tok


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory):
    """One real `medlora train` of the tiny model through the CLI (8 steps, checkpoints at 4 and 8), shared."""
    out = tmp_path_factory.mktemp("run") / "tiny-run"
    cache = tmp_path_factory.mktemp("tinycache") / "tiny"
    args = ["train", "--config", "configs/tiny.yaml", "--output_dir", str(out), "--max_steps", "8",
            "--eval_steps", "4", "--save_steps", "4", "--report_to", "none", "--tiny_cache_dir", str(cache)]
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, cache, args, result
