"""The training path on CPU: TRL's loss through medlora's CPU shim, adapter round trip, CLI contract."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_cli, run_main


def test_sft_loss_on_cpu_equals_the_models_own_loss(tiny):
    from trl.trainer.utils import add_fused_lm_head

    from medlora.compat import patch_trl_cpu_loss

    model, tok = tiny
    import copy

    patched = copy.deepcopy(model)
    patch_trl_cpu_loss()
    add_fused_lm_head(patched, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.tensor([tok.encode("Question: which nerve?\nChoices:\nA. x\nAnswer: A. x</s>")])
    labels = ids.clone()
    labels[:, :6] = -100
    reference = model(input_ids=ids, labels=labels).loss
    fused = patched(input_ids=ids, labels=labels, fused_lm_head=True)
    loss = -fused.log_probs.sum() / fused.label_mask.sum()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)


def test_train_writes_adapter_and_metrics(cli_run):
    out, _, _, result = cli_run
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("train_loss", "eval_loss", "eval_accuracy", "base_eval_accuracy", "per_subject", "config", "versions"):
        assert key in metrics, key
    assert metrics["global_steps"] == 8 and metrics["audits"]["gradients"]["lora_tensors"] > 0
    assert metrics["backend"] == "hf" and metrics["backend_report"]["sdpa_cudnn"] is False  # hf's default: off
    assert metrics["versions"]["transformers"] == "5.17.0" and metrics["versions"]["trl"] == "1.15.0"
    assert any("eval_accuracy" in entry for entry in metrics["log_history"])  # the callback logged accuracy
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").exists()
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert tensors and all("lora_" in name for name in tensors)  # no embedding matrices saved
    assert any("experts" in name for name in tensors) and any("in_proj" in name for name in tensors)
    assert "audits passed" in result.stdout
    assert metrics["format"]["stop"] == {"token": "</s>", "id": 2, "reason": "the tokenizer's eos; trained in this model"}
    assert metrics["audits"]["tokens"]["trained_token_ids"] > 10 and metrics["audits"]["tokens"]["think_tag_examples"] == 0
    assert json.loads((adapter / "medlora_format.json").read_text()) == metrics["format"]


def test_adapter_reloads_to_identical_logits(cli_run, tiny_dir):
    from peft import PeftModel

    from medlora.config import ModelArguments
    from medlora.model import load_model

    out, cache, _, _ = cli_run
    base, tok = load_model(ModelArguments(model_name_or_path=str(cache)))
    ids = torch.tensor([tok.encode("Question: x?\nAnswer:")])
    base_logits = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, out / "adapter")
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert not torch.allclose(adapted, base_logits)  # the adapter changes the model
    torch.testing.assert_close(adapted, again)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_second_run_into_same_output_dir_is_refused(cli_run, capsys):
    _, _, args, _ = cli_run
    code, _, err = run_main(args, capsys)
    assert code == 2 and "already holds a run" in err and "--overwrite" in err


def test_unsloth_backend_without_gpu_is_one_sentence(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    code, _, err = run_main(["train", "--config", "configs/tiny.yaml", "--backend", "unsloth",
                                "--output_dir", str(tmp_path / "u")], capsys)
    assert code == 2 and "needs an NVIDIA GPU" in err and "--backend hf" in err


def test_train_unsloth_script_without_gpu_exits_cleanly(tmp_path):
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    result = subprocess.run([sys.executable, "scripts/train_unsloth.py", "--config", "configs/tiny.yaml",
                             "--output_dir", str(tmp_path / "u")], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "needs an NVIDIA GPU" in result.stderr and "Traceback" not in result.stderr


def test_resume_from_checkpoint_auto_continues_the_run(tmp_path, tiny_dir):
    from medlora.config import parse_config, training_sections
    from medlora.train import train

    base = ["--config", "configs/tiny.yaml", "--model_name_or_path", str(tiny_dir), "--output_dir",
            str(tmp_path / "run"), "--save_steps", "3", "--eval_strategy", "no", "--report_to", "none",
            "--eval_accuracy_samples", "4", "--disable_tqdm", "true", "--audit", "false"]
    first = train(*parse_config(base + ["--max_steps", "3"], training_sections()))
    assert first["global_steps"] == 3 and (tmp_path / "run" / "checkpoint-3").is_dir()
    resumed = train(*parse_config(base + ["--max_steps", "6", "--resume_from_checkpoint", "auto"],
                                  training_sections()))
    assert resumed["global_steps"] == 6
    steps = [e["step"] for e in resumed["log_history"] if "loss" in e]
    assert steps and min(steps) > 3  # the resumed run did not start again from step 0


def test_building_the_tiny_model_leaves_the_callers_rng_alone(tmp_path):
    from medlora.model import build_tiny_model

    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    build_tiny_model(tmp_path / "tiny")  # a fresh build: seeds and draws its own random weights
    torch.testing.assert_close(torch.rand(3), expected)


def test_base_checkpoint_trap_trains_the_document_separator(base_trap_dir, tmp_path, capsys):
    """Nemotron-3 Base declares eos <|im_end|>, a token its model never trained: plain style must end answers with
    the trained document separator </s>, say so, record it; forcing <|im_end|> is refused before step 1."""
    from medlora.config import parse_config, training_sections
    from medlora.train import train

    base = ["--config", "configs/tiny.yaml", "--model_name_or_path", str(base_trap_dir), "--max_steps", "2",
            "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--eval_accuracy_samples", "4",
            "--disable_tqdm", "true"]
    metrics = train(*parse_config(base + ["--output_dir", str(tmp_path / "run")], training_sections()))
    out = capsys.readouterr().out
    stop = metrics["format"]["stop"]
    assert stop["token"] == "</s>" and stop["id"] == 2 and "'<|im_end|>' (id 5: all-zero" in stop["reason"]
    assert "stop token '</s>' (id 2)" in out
    card = (tmp_path / "run" / "MODEL_CARD.md").read_text()
    assert "Stop token (ends every trained answer): `</s>` (id 2)" in card
    code, _, err = run_main(["train", *base, "--stop_token", "<|im_end|>", "--output_dir", str(tmp_path / "forced")],
                               capsys)
    assert code == 2 and err.count("medlora: error:") == 1 and "token audit failed" in err and "--stop_token auto" in err
    assert not (tmp_path / "forced" / "adapter").exists()
