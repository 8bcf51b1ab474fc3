"""Faults a multi-hour nohup run meets: kill -9 and resume, torn checkpoints, SIGTERM/SIGINT, NaN, a second run
on the same output dir, out-of-memory, and secrets that must never reach the outputs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT

FAKE_TOKEN = "hf_medloraFAKEtoken0123456789abcdefXYZ"


def train_cmd(tiny_dir, out, *extra):
    return [sys.executable, "-m", "medlora.cli", "train", "--config", "configs/tiny.yaml",
            "--model_name_or_path", str(tiny_dir), "--output_dir", str(out), "--max_steps", "8", "--save_steps", "2",
            "--save_total_limit", "4", "--eval_strategy", "no", "--logging_steps", "1",
            "--eval_accuracy_samples", "4", "--report_to", "none", *extra]


def env(**extra):
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def wait_for(path: Path, proc: subprocess.Popen, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended (exit {proc.returncode}) before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.05)  # polling the file system for the checkpoint, not standing in for work


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_dir):
    """An uninterrupted run, with a fake HF token in the environment (it must appear nowhere)."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    proc = subprocess.run(train_cmd(tiny_dir, out), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env(HF_TOKEN=FAKE_TOKEN, HUGGING_FACE_HUB_TOKEN=FAKE_TOKEN))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_kill_9_then_resume_auto_gives_the_bit_identical_adapter_and_skips_a_torn_checkpoint(
        reference_run, tmp_path, tiny_dir):
    from medlora.safety import MARKER, checkpoint_problem

    reference, _ = reference_run
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(tiny_dir, out), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for(out / "checkpoint-4" / MARKER, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter").exists()  # it really died mid-run

    # tear the newest complete checkpoint: resume must notice, say so, and take the one before
    complete = sorted((p for p in out.glob("checkpoint-*") if checkpoint_problem(p) is None),
                      key=lambda p: int(p.name.split("-")[1]))
    assert len(complete) >= 2
    newest = complete[-1]
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])

    resumed = subprocess.run(train_cmd(tiny_dir, out, "--resume_from_checkpoint", "auto"), cwd=ROOT,
                             capture_output=True, text=True, timeout=600, env=env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping torn checkpoint {newest}: optimizer.pt differs" in resumed.stdout + resumed.stderr
    steps_run = sum(line.startswith("{'loss'") for line in resumed.stdout.splitlines())  # one per step run here
    assert steps_run == 8 - int(complete[-2].name.split("-")[1]), resumed.stdout[-2000:]  # continued, not restarted
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (reference / "adapter" / "adapter_model.safetensors").read_bytes()


def test_an_explicit_torn_checkpoint_is_refused(reference_run, tmp_path, capsys):
    import shutil

    from medlora.cli import main
    from medlora.safety import MARKER

    reference, _ = reference_run
    torn = tmp_path / "checkpoint-8"
    shutil.copytree(reference / "checkpoint-8", torn)
    (torn / MARKER).unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "configs/tiny.yaml", "--output_dir", str(tmp_path / "o"),
              "--resume_from_checkpoint", str(torn)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "torn or incomplete" in err and "auto" in err


@pytest.mark.parametrize("signum, second", [(signal.SIGTERM, None), (signal.SIGINT, None),
                                            (signal.SIGTERM, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT)])
def test_signal_saves_a_checkpoint_and_exits_cleanly(signum, second, tmp_path, tiny_dir):
    """One signal: checkpoint saved and committed, exit 128 + signal. A second one 50 ms later: aborted at once
    with its own status and one line, no traceback."""
    from medlora.safety import MARKER, checkpoint_problem

    out = tmp_path / "signalled"
    cmd = train_cmd(tiny_dir, out)
    cmd[cmd.index("--max_steps") + 1], cmd[cmd.index("--save_steps") + 1] = "100000", "100000"  # saves only on signal
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    steps_logged = 0
    for line in proc.stdout:  # the Trainer logs every step (logging_steps 1): signal after the third
        steps_logged += "'loss'" in line
        if steps_logged == 3:
            break
    assert steps_logged == 3, f"run ended (exit {proc.poll()}) before three steps were logged"
    proc.send_signal(signum)
    if second is not None:
        time.sleep(0.05)
        proc.send_signal(second)
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 128 + second, stderr[-3000:]
        assert "Traceback" not in stderr and stderr.count("medlora: stopped: a second signal") == 1, stderr[-3000:]
        return
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr and f"{signal.Signals(signum).name} at step" in stderr
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and checkpoint_problem(checkpoints[0]) is None
    assert (checkpoints[0] / MARKER).exists() and not (out / "adapter").exists()


def test_nan_stops_naming_the_step_and_leaves_the_last_checkpoint_intact(tmp_path, tiny_dir, monkeypatch, capsys):
    from trl import SFTTrainer

    from medlora.cli import main
    from medlora.safety import checkpoint_problem

    original = SFTTrainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if self.model.training and self.state.global_step == 4 else loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as exit_info:
        main(train_cmd(tiny_dir, out)[3:])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "step 5: non-finite gradients" in err and "loss nan" in err and "checkpoint-4" in err, err
    assert checkpoint_problem(out / "checkpoint-4") is None and not (out / "checkpoint-6").exists()


def test_a_second_run_on_a_locked_output_dir_is_refused_and_a_killed_holder_frees_it(tmp_path, capsys):
    from medlora.cli import main
    from medlora.safety import RunLock

    out = tmp_path / "locked"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from medlora.safety import RunLock; "
                               f"lock = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)", str(out)],
                              cwd=ROOT, env=env(PYTHONPATH=str(ROOT / "src")), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "configs/tiny.yaml", "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"in use by a running medlora run (pid {holder.pid}" in err
    holder.kill()  # SIGKILL: no cleanup code runs; the kernel drops the flock
    holder.wait(timeout=30)
    RunLock(out).acquire().release()


def test_out_of_memory_names_the_knobs(tmp_path, tiny_dir, monkeypatch, capsys):
    from trl import SFTTrainer

    from medlora.cli import main

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)")

    monkeypatch.setattr(SFTTrainer, "train", oom)
    with pytest.raises(SystemExit) as exit_info:
        main(train_cmd(tiny_dir, tmp_path / "oom")[3:])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "out of GPU memory (CUDA out of memory. Tried to allocate 20.00 GiB" in err
    for knob in ("--per_device_train_batch_size", "--max_length", "--gradient_checkpointing", "--load_in_4bit"):
        assert knob in err


def test_the_hf_token_never_reaches_logs_metrics_configs_or_the_model_card(reference_run, capsys):
    from medlora.cli import main

    out, proc = reference_run
    assert FAKE_TOKEN not in proc.stdout + proc.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in files) and (out / "MODEL_CARD.md").exists()
    leaked = [str(p) for p in files if FAKE_TOKEN.encode() in p.read_bytes()]
    assert not leaked
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "configs/tiny.yaml", "--output_dir", str(out.parent / "t"), "--hub_token",
              FAKE_TOKEN])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "HF_TOKEN" in err and FAKE_TOKEN not in err


def test_model_card_states_data_licence_metrics_and_not_medical_advice(reference_run, tmp_path, capsys):
    from medlora.cli import main

    out, _ = reference_run
    card = (out / "MODEL_CARD.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert "**Not medical advice.**" in card and "## Intended use" in card
    assert str(metrics["config"]["ModelArguments"]["model_name_or_path"]) in card
    assert "CC0" in card and "| subject | n | base | adapter |" in card
    assert all(f"| {subject} | {row['n']} |" in card for subject, row in metrics["per_subject"].items())
    assert f"transformers {metrics['versions']['transformers']}" in card
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--run_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "no metrics.json" in capsys.readouterr().err
    main(["report", "--run_dir", str(out), "--output", str(tmp_path / "card.md")])
    assert (tmp_path / "card.md").read_text() == card


def torch_load_calls(path: Path) -> list[tuple[int, bool]]:
    """(line, has weights_only=True) of every torch.load(...) call in a Python file, found with its AST."""
    import ast

    calls = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            calls.append((node.lineno, safe))
    return calls


def test_no_unsafe_loading_in_the_package_or_the_resume_path():
    """Every torch.load that medlora or a resume reaches (medlora, the Trainer's checkpoint loading) passes
    weights_only=True, no pickle.load anywhere in medlora, and remote code stays off by default. Shown to fail:
    a `torch.load(path)` added to a copy of medlora/train.py is reported with its line."""
    import inspect

    import transformers.trainer

    from medlora.backends import load_for_training
    from medlora.config import parse_config, training_sections
    from medlora.model import load_model

    package = sorted((ROOT / "src" / "medlora").glob("*.py"))
    scanned = {p: torch_load_calls(p) for p in [*package, Path(transformers.trainer.__file__)]}
    unsafe = [f"{p.name}:{line}" for p, calls in scanned.items() for line, safe in calls if not safe]
    assert not unsafe, unsafe
    assert sum(len(c) for c in scanned.values()) >= 5  # the resume path's loads were found: the scan sees calls
    assert not [p.name for p in package if "pickle.load" in p.read_text()]
    *_, train_args = parse_config(["--output_dir", "unused"], training_sections())
    assert train_args.trust_remote_code is False
    for func in (load_model, load_for_training):
        assert inspect.signature(func).parameters["trust_remote_code"].default is False


def test_remote_code_in_a_model_dir_is_never_run(tmp_path, tiny_dir):
    """A model dir that asks for remote code (config auto_map + a .py next to it) is refused, its code unrun."""
    import json
    import shutil

    from medlora.config import ModelArguments
    from medlora.errors import MedloraError
    from medlora.model import load_model

    crafted = tmp_path / "crafted"
    shutil.copytree(tiny_dir, crafted)
    config = json.loads((crafted / "config.json").read_text())
    marker = tmp_path / "code-ran"
    config.update(model_type="crafted_lm", auto_map={"AutoConfig": "evil.Config",
                                                     "AutoModelForCausalLM": "evil.Model"})
    (crafted / "config.json").write_text(json.dumps(config))
    (crafted / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    for four_bit in (False, True):  # --load_in_4bit reads the config itself (medlora.model.load_4bit)
        with pytest.raises(MedloraError, match="cannot load"):
            load_model(ModelArguments(model_name_or_path=str(crafted), load_in_4bit=four_bit))
    assert not marker.exists()


def test_an_output_dir_that_cannot_be_created_is_one_clear_line(tmp_path, capsys):
    from medlora.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "configs/tiny.yaml", "--output_dir", str(blocker / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"--output_dir {blocker / 'run'}: cannot write there" in err
    assert "Traceback" not in err
