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


def rel(a, b) -> float:
    """Relative error |a - b| / |b| over the whole tensor (the tolerance measure of the equivalence tests)."""
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm().clamp_min(1e-12))


def run_main(args, capsys):
    """(exit code, stdout, stderr) of `medlora ARGS` in this process; an uncaught exception reads as a traceback."""
    import traceback

    from medlora.cli import main

    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exit_info:
        code = exit_info.code
    except Exception:  # noqa: BLE001 - what a user would see: a bare Python traceback
        code = "traceback"
        sys.stderr.write(traceback.format_exc())
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(args, cwd=ROOT, timeout=900, env=None):
    """`medlora ARGS` in a new process (for what only a process shows: signals, imports, exit codes)."""
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
