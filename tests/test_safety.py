"""Run safety at unit level: the run directory, committed checkpoints (tests/test_faults.py does it to real
processes)."""

import pytest


def test_output_dir_with_a_run_is_kept_unless_overwrite_or_resume(tmp_path):
    from medlora.errors import MedloraError
    from medlora.safety import check_output_dir

    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(MedloraError, match="already holds a run"):
        check_output_dir(tmp_path, overwrite=False, resume=None)
    check_output_dir(tmp_path, overwrite=True, resume=None)
    check_output_dir(tmp_path, overwrite=False, resume="auto")




def test_a_checkpoint_counts_only_once_committed_and_unchanged(tmp_path):
    from medlora.safety import MARKER, checkpoint_problem, commit_checkpoint, last_good_checkpoint

    older, newer = tmp_path / "checkpoint-2", tmp_path / "checkpoint-10"  # numeric order, not text order
    for path in (older, newer):
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"weights")
    assert "no medlora_complete.json" in checkpoint_problem(older)
    commit_checkpoint(older)
    assert checkpoint_problem(older) is None
    said = []
    assert last_good_checkpoint(tmp_path, say=said.append) == str(older) and "checkpoint-10" in said[0]
    commit_checkpoint(newer)
    assert last_good_checkpoint(tmp_path) == str(newer)
    (newer / "adapter_model.safetensors").write_bytes(b"changed")  # same size, other bytes: still torn
    assert "differs from what was written" in checkpoint_problem(newer)
    (older / MARKER).write_text("{not json")
    assert "unreadable" in checkpoint_problem(older)


def test_resume_points(tmp_path, capsys):
    from medlora.errors import ConfigError
    from medlora.safety import commit_checkpoint, resolve_resume

    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "auto") is None and "starting from step 0" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="is not a checkpoint directory"):
        resolve_resume(tmp_path, str(tmp_path / "nope"))
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(ConfigError, match="torn or incomplete"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-3"))
    commit_checkpoint(tmp_path / "checkpoint-3")
    assert resolve_resume(tmp_path, "auto") == str(tmp_path / "checkpoint-3")
