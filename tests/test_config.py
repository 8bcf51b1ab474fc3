"""Configuration: dataclasses = YAML keys = CLI flags; each dataclass's validator; config files."""

import pytest

from conftest import ROOT, run_cli, run_main


@pytest.mark.parametrize("yaml_text,match", [
    ("lerning_rate: 0.1\n", "unknown key 'lerning_rate' (did you mean 'learning_rate'?)"),
    ("max_steps: many\n", "invalid int value: 'many'"),
    ("style: poetry\n", "--style must be 'plain' or 'chat'"),
    ("- a\n- b\n", "must be a YAML mapping"),
])
def test_bad_config_is_one_clear_line(tmp_path, yaml_text, match, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    code, _, err = run_main(["train", "--config", str(cfg), "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and match in err, err


def test_missing_config_file(tmp_path, capsys):
    code, _, err = run_main(["train", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "does not exist" in err


def test_cli_errors_have_no_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lerning_rate: 0.1\n")
    result = run_cli(["train", "--config", str(cfg)], timeout=300)
    assert result.returncode == 2 and "did you mean" in result.stderr and "Traceback" not in result.stderr


def test_config_files_start_with_their_command():
    for path in (ROOT / "configs").glob("*.yaml"):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and str(path.relative_to(ROOT)) in first, path




@pytest.mark.parametrize("section, changes, message", [
    ("ModelArguments", {"torch_dtype": "fp8"}, "--torch_dtype: unknown dtype 'fp8'"),
    ("ModelArguments", {"experts_implementation": "magic"}, "--experts_implementation must be eager"),
    ("LoraArguments", {"lora_r": 0}, "--lora_r must be positive, got 0"),
    ("LoraArguments", {"lora_target_modules": ["out_proj"]}, "cannot be LoRA targets on nemotron_h"),
    ("DataArguments", {"eval_fraction": 1.5}, "--eval_fraction must be in (0, 1), got 1.5"),
    ("DataArguments", {"style": "poetry"}, "--style must be 'plain' or 'chat'"),
    ("RunArguments", {"backend": "jax"}, "--backend must be one of ('hf', 'unsloth', 'fast'), got 'jax'"),
    ("RunArguments", {"fast_levers": ["warp"]}, "--fast_levers: unknown ['warp']"),
    ("RunArguments", {"fast_gpu_arch": "sm70"}, "--fast_gpu_arch must be auto or sm80"),
    ("RunArguments", {"fast_checkpoint_blocks": ["ffn"]}, "--fast_checkpoint_blocks: unknown ['ffn']"),
    ("EvalArguments", {"limit": -5}, "--limit must be positive, got -5"),
    ("EvalArguments", {"compare_base": True}, "pass --adapter DIR too"),
])
def test_each_dataclass_validates_its_own_fields(section, changes, message):
    import dataclasses

    from medlora import config
    from medlora.errors import ConfigError

    cls = getattr(config, section)
    cls().validate()  # the defaults are valid
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(cls(), **changes).validate()
    assert message in str(err.value)


def test_sft_checks_know_the_backend(tmp_path):
    from medlora.config import RunArguments, parse_config, training_sections, validate_sft
    from medlora.errors import ConfigError

    *_, run, train = parse_config(["--output_dir", str(tmp_path), "--packing", "true"], training_sections())
    with pytest.raises(ConfigError, match="--packing: samples packed"):
        validate_sft(train, run)
    validate_sft(train, RunArguments(backend="fast"))  # fast keeps the sequence boundaries


@pytest.mark.parametrize("spec, setting, expected", [
    ("hf", None, False), ("hf+triton", None, False),  # the default: off where cuDNN builds a plan per length
    ("unsloth", None, True), ("fast", None, True), ("fast[-varlen_attention]", None, True),  # torch's default
    ("hf", True, True), ("hf+triton", True, True), ("fast", False, False), ("unsloth", False, False),  # as told
])
def test_sdpa_cudnn_is_off_for_the_hf_backends_unless_told(spec, setting, expected):
    import torch

    from medlora.backend import Backend
    from medlora.backends import set_sdpa_cudnn

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)  # torch's default, whatever an earlier test left
        assert set_sdpa_cudnn(Backend.parse(spec), setting) is expected
        assert torch.backends.cuda.cudnn_sdp_enabled() is expected
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_sdpa_cudnn_is_a_flag_and_a_yaml_key(tmp_path):
    from medlora.config import parse_config, training_sections

    def run_args(argv):
        *_, run, _ = parse_config(argv, training_sections())
        return run

    assert run_args(["--output_dir", str(tmp_path)]).sdpa_cudnn is None
    assert run_args(["--output_dir", str(tmp_path), "--sdpa_cudnn", "true"]).sdpa_cudnn is True
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path}\nsdpa_cudnn: false\n")
    assert run_args(["--config", str(cfg)]).sdpa_cudnn is False


def test_the_backend_is_read_before_transformers_without_a_regex(tmp_path):
    from medlora.backends import requested_backend

    cfg = tmp_path / "c.yaml"
    cfg.write_text("# backend: unsloth (a comment)\nlearning_rate: 0.1\nbackend: fast\n")
    assert requested_backend(["--config", str(cfg)]) == "fast"
    assert requested_backend(["--config", str(cfg), "--backend", "hf", "--backend", "unsloth"]) == "unsloth"
    cfg.write_text("backend: fast\nbackend: unsloth\n")  # a duplicated key is refused later, with the file named
    assert requested_backend(["--config", str(cfg)]) is None
    cfg.write_text("notes: 'backend: unsloth'\n")  # the text a regex would have matched
    assert requested_backend(["--config", str(cfg)]) is None
    assert requested_backend(["--config", str(tmp_path / "missing.yaml")]) is None


def test_offloading_checkpoints_without_checkpointing_is_refused_at_startup(tmp_path, capsys):
    """--fast_levers offload_checkpoints moves checkpointed blocks' inputs: with nothing checkpointed it would do
    nothing, so the CLI says so before loading anything (with checkpointing on, the same levers validate)."""
    from medlora.config import RunArguments, parse_config, training_sections

    levers = ["--backend", "fast", "--fast_levers", "triton_mamba", "offload_checkpoints"]
    code, _, err = run_main(["train", "--config", "configs/tiny.yaml", "--output_dir", str(tmp_path / "o"), *levers,
                             "--gradient_checkpointing", "false"], capsys)
    assert code == 2 and "offload_checkpoints" in err and "--gradient_checkpointing true" in err, err
    assert not (tmp_path / "o").exists()
    *_, run, train = parse_config(["--output_dir", str(tmp_path), *levers, "--gradient_checkpointing", "true"],
                                  training_sections())
    assert isinstance(run, RunArguments)
    run.validate(train)
