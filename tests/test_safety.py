"""Run safety at unit level: the run directory, committed checkpoints (tests/test_faults.py does it to real
processes)."""

import pytest


def test_output_dirs_are_owned_and_only_medlora_s_own_files_are_replaced(tmp_path):
    """The data-loss cases of issue 13: a user's file, the input's own directory, a file path, a finished run."""
    from medlora.errors import MedloraError
    from medlora.outputs import MANIFEST, claim_output_dir

    run = tmp_path / "run"
    claim_output_dir(run, "train")  # new: taken, manifest written
    assert (run / MANIFEST).is_file()
    (run / "metrics.json").write_text("{}")
    (run / "checkpoint-4").mkdir()
    with pytest.raises(MedloraError, match="already holds a run .*--overwrite true"):
        claim_output_dir(run, "train")
    claim_output_dir(run, "train", keep=True)  # a resume keeps everything
    assert (run / "checkpoint-4").is_dir()
    claim_output_dir(run, "train", overwrite=True)  # --overwrite retires the old run, checkpoints included
    assert not (run / "metrics.json").exists() and not (run / "checkpoint-4").exists()
    (run / "notes.txt").write_text("mine")
    for kwargs in ({}, {"overwrite": True}, {"keep": True}):
        with pytest.raises(MedloraError, match=r"holds files medlora did not write \(notes.txt\)"):
            claim_output_dir(run, "train", **kwargs)
    assert (run / "notes.txt").read_text() == "mine"
    repo = tmp_path / "repo"  # `train --output_dir .` in a repository
    repo.mkdir()
    (repo / "README.md").write_text("the project's readme")
    with pytest.raises(MedloraError, match="did not write"):
        claim_output_dir(repo, "train", overwrite=True)
    data = tmp_path / "data"
    data.mkdir()
    (data / "rows.jsonl").write_text("{}")
    with pytest.raises(MedloraError, match="holds the input"):
        claim_output_dir(data, "prepare", overwrite=True, inputs=[data / "rows.jsonl"])
    with pytest.raises(MedloraError, match="is a file"):
        claim_output_dir(data / "rows.jsonl", "eval")
    with pytest.raises(MedloraError, match="is empty"):
        claim_output_dir("", "eval")
    # another command's directory inside a run dir (notebook 03 evaluates into RUN/eval) is medlora's too
    claim_output_dir(run / "eval", "eval")
    (run / "notes.txt").unlink()
    claim_output_dir(run, "train", overwrite=True)
    assert not (run / "eval").exists()


def test_a_finished_run_is_never_restarted_by_auto(tmp_path):
    from medlora.errors import ConfigError
    from medlora.safety import resolve_resume

    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds a finished run .*--overwrite true"):
        resolve_resume(tmp_path, "auto")


def test_the_model_card_never_replaces_another_file(tmp_path):
    from medlora.errors import MedloraError
    from medlora.modelcard import CARD_MARKER
    from medlora.outputs import claim_output_file

    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"train_loss": 1}')
    with pytest.raises(MedloraError, match="was not written by medlora"):
        claim_output_file(metrics, CARD_MARKER)
    card = tmp_path / "MODEL_CARD.md"
    card.write_text(CARD_MARKER + "\n# old card\n")
    assert claim_output_file(card, CARD_MARKER) == card
    with pytest.raises(MedloraError, match="does not exist"):
        claim_output_file(tmp_path / "nope" / "card.md", CARD_MARKER)


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


def test_rotation_deletes_only_after_a_newer_checkpoint_is_committed(tmp_path):
    from medlora.safety import commit_checkpoint, rotate_checkpoints

    def make(step, commit=True):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        (path / "optimizer.pt").write_bytes(b"x" * step)
        if commit:
            commit_checkpoint(path)
        return path

    make(2), make(4), make(6, commit=False)  # 6: being written (or torn by a kill): 2 and 4 must both stay
    assert rotate_checkpoints(tmp_path, 2) == [] and {p.name for p in tmp_path.iterdir()} == {
        "checkpoint-2", "checkpoint-4", "checkpoint-6"}
    make(8)  # committed: now 2 (beyond the limit) and the torn 6 (older than a complete one) may go
    assert sorted(rotate_checkpoints(tmp_path, 2, keep=[tmp_path / "checkpoint-8"])) == ["checkpoint-2",
                                                                                       "checkpoint-6"]
    make(10)
    assert rotate_checkpoints(tmp_path, 1, keep=[tmp_path / "checkpoint-4"]) == ["checkpoint-8"]  # the best stays
    assert rotate_checkpoints(tmp_path, None) == []


def test_a_resume_refuses_other_settings_and_data_and_names_them(tmp_path):
    from medlora.config import parse_config, training_sections
    from medlora.errors import ConfigError
    from medlora.safety import FINGERPRINT, check_resume_fingerprint, run_fingerprint

    def fingerprint(*flags, rows=({"id": "1", "question": "q", "cop": 0},)):
        model, lora, data, run, train = parse_config(["--output_dir", str(tmp_path), *flags], training_sections())
        return run_fingerprint((model, lora, data, run), train, {"train": list(rows), "eval": []}, 1)

    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / FINGERPRINT).write_text(__import__("json").dumps(fingerprint("--learning_rate", "1e-4")))
    said = []
    check_resume_fingerprint(str(checkpoint), fingerprint("--learning_rate", "1e-4", "--max_steps", "90"), said.append)
    assert "max_steps" in said[0]  # may change, with a word
    for flags, rows, named in ((("--learning_rate", "2e-4"), None, "learning_rate 0.0001 -> 0.0002"),
                               (("--learning_rate", "1e-4", "--lora_r", "8"), None, "lora_r 16 -> 8"),
                               (("--learning_rate", "1e-4", "--max_length", "64"), None, "max_length"),
                               (("--learning_rate", "1e-4"), ({"id": "2", "question": "other", "cop": 1},),
                                "the training/eval data")):
        with pytest.raises(ConfigError, match="belongs to a run with other settings") as err:
            check_resume_fingerprint(str(checkpoint), fingerprint(*flags, **({"rows": rows} if rows else {})))
        assert named in str(err.value)
    (checkpoint / FINGERPRINT).unlink()
    said.clear()
    check_resume_fingerprint(str(checkpoint), fingerprint(), said.append)
    assert "cannot be compared" in said[0]
