"""The careful medical fine-tuning recipe: the best checkpoint by MedMCQA accuracy, early stopping, the forgetting
guard with a replay mixture, and `medlora sweep`.

The selection logic is what is under test here, so the accuracy a run sees at each evaluation is scripted (the
tiny model's own accuracy is noise): `scripted_accuracy` replaces the scoring inside the accuracy callback (and
the general-knowledge guard) with a value per step. Everything else — the Trainer, checkpoints, rotation,
resume, loading the best adapter, Optuna — is the real code.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SAMPLE, run_main

GENERAL = Path(__file__).resolve().parents[1] / "data" / "sample" / "general_mcq_sample.jsonl"


def scripted_accuracy(monkeypatch, by_step, general_by_step=None):
    """MedMCQA accuracy (and general accuracy) at each evaluation from a table instead of scoring."""
    from medlora import trainer as trainer_module

    def medmcqa(self, args, state, control, metrics=None, **kwargs):
        value = by_step(state, args) if callable(by_step) else by_step[state.global_step]
        if metrics is not None:
            metrics["eval_accuracy"] = value
        self.trainer.log({"eval_accuracy": value, "eval_accuracy_n": len(self.rows)})

    monkeypatch.setattr(trainer_module.MedMCQAAccuracyCallback, "on_evaluate", medmcqa)
    if general_by_step is not None:
        original = trainer_module.ForgettingGuard.score

        def general(self, model):
            step = self.trainer.state.global_step if self.base_accuracy is not None else 0
            return general_by_step.get(step, original(self, model) if step == 0 else general_by_step[max(
                k for k in general_by_step if k <= step)])

        monkeypatch.setattr(trainer_module.ForgettingGuard, "score", general)


def train_args(tiny_dir, out, *extra):
    return ["train", "--config", "configs/tiny.yaml", "--model_name_or_path", tiny_dir, "--output_dir", out,
            "--max_steps", "20", "--eval_steps", "2", "--save_steps", "2", "--save_total_limit", "1",
            "--learning_rate", "0.01", "--warmup_steps", "0", "--logging_steps", "2", "--report_to", "none",
            "--audit", "false", "--eval_accuracy_samples", "4", *extra]


BEST = ["--metric_for_best_model", "eval_accuracy", "--load_best_model_at_end", "true", "--early_stopping_patience",
        "2"]


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_adapter_is_the_best_checkpoint_and_the_run_stops_after_the_patience(tiny_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    """Accuracy 0.3, 0.6, 0.5, 0.4 at steps 2-8: the best is step 4; two evaluations without improvement stop the
    run at step 8 of 20; adapter/ is checkpoint-4's, bit for bit; save_total_limit 1 keeps the newest and the best.
    First the run stops at step 6 (a shorter --max_steps, as a crash would) and is resumed: the best so far and the
    patience count come back from the checkpoint."""
    monkeypatch.setenv("COLUMNS", "300")
    scripted_accuracy(monkeypatch, {2: 0.3, 4: 0.6, 6: 0.5, 8: 0.4, 10: 0.9, 12: 0.9})
    out = tmp_path / "run"
    code, _, err = run_main(train_args(tiny_dir, out, *BEST, "--max_steps", "6"), capsys)
    assert code == 0, err[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # newest + best
    code, stdout, err = run_main(train_args(tiny_dir, out, *BEST, "--resume_from_checkpoint", "auto"), capsys)
    assert code == 0, err[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_steps"] == 8 and metrics["early_stopping"]["stopped_early"]  # 6 (1 miss) + 8 (2 misses)
    assert metrics["best_checkpoint"] == {"metric": "eval_accuracy", "value": 0.6, "step": 4,
                                          "checkpoint": "checkpoint-4", "adapter_is_best": True}
    assert metrics["last_eval"]["step"] == 8 and metrics["last_eval"]["eval_accuracy"] == 0.4
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    adapter = lora_tensors(out / "adapter")
    assert identical(adapter, lora_tensors(out / "checkpoint-4"))
    assert not identical(adapter, lora_tensors(out / "checkpoint-8"))  # it did train on after step 4
    assert "stopped at step 8 of 20" in stdout and "best checkpoint" in stdout
    card = (out / "MODEL_CARD.md").read_text()
    assert "The adapter is the best checkpoint, step 4" in card and "Early stopping (patience 2): stopped" in card


def test_the_forgetting_guard_stops_the_run_and_keeps_that_checkpoint(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    scripted_accuracy(monkeypatch, lambda state, args: 0.5, general_by_step={0: 0.6, 2: 0.58, 4: 0.57, 6: 0.5})
    out = tmp_path / "run"
    code, stdout, err = run_main(train_args(tiny_dir, out, "--general_eval_data", GENERAL, "--max_forgetting", "0.05",
                                            "--save_steps", "4"), capsys)
    assert code == 0, err[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    stop = metrics["forgetting"]["stopped"]
    assert stop["step"] == 6 and stop["drop"] == pytest.approx(0.1) and metrics["global_steps"] == 6
    assert (out / "checkpoint-6" / "medlora_complete.json").is_file()  # saved although save_steps is 4
    assert "forgetting guard: stopped at step 6" in stdout and "0.100 below the base model's 0.600" in stdout
    history = [e for e in metrics["log_history"] if "eval_general_accuracy" in e]
    assert sorted({e["step"] for e in history}) == [2, 4, 6] and history[0]["eval_general_drop"] == pytest.approx(0.02)
    assert "**the run was stopped at step 6**" in (out / "MODEL_CARD.md").read_text()


def test_forgetting_seen_only_at_the_closing_evaluation_is_reported_not_called_a_stop(tiny_dir, tmp_path, capsys,
                                                                                      monkeypatch):
    """`--eval_delay 6` keeps every evaluation out of a 5-step run (the Trainer evaluates the last step otherwise), so
    only the closing evaluation sees the 0.2 drop: reported as the final adapter's drop with advice, not as a stop
    that never happened."""
    monkeypatch.setenv("COLUMNS", "300")
    scripted_accuracy(monkeypatch, lambda state, args: 0.5, general_by_step={0: 0.6, 5: 0.4})
    out = tmp_path / "run"
    code, stdout, err = run_main(train_args(tiny_dir, out, "--general_eval_data", GENERAL, "--max_forgetting", "0.05",
                                            "--max_steps", "5", "--eval_delay", "6"), capsys)
    assert code == 0, err[-3000:]
    forgetting = json.loads((out / "metrics.json").read_text())["forgetting"]
    assert forgetting["stopped"] is None and forgetting["general_accuracy"] == 0.4
    assert forgetting["drop"] == pytest.approx(0.2)
    assert "the final adapter's general accuracy 0.400 is 0.200 below" in stdout and "stopped at step" not in stdout


def test_replay_mixture_is_seeded_counted_and_never_measures_what_it_replays(tmp_path):
    from medlora.config import DataArguments
    from medlora.data import load_training_data, normalise_key

    args = DataArguments(data_path=str(SAMPLE), eval_fraction=0.15, general_eval_data=str(GENERAL),
                         mix_data=str(GENERAL), mix_ratio=0.2)
    data = load_training_data(args)
    medical = [r for r in data.train_rows if "general" not in r["source"]]
    replay = [r for r in data.train_rows if "general" in r["source"]]
    assert data.mix["medical"] == len(medical) and data.mix["replay"] == len(replay)
    assert abs(len(replay) / len(data.train_rows) - 0.2) < 0.02 and data.mix["split_from_general_eval_data"]
    assert not {normalise_key(r["question"]) for r in replay} & {normalise_key(r["question"]) for r in data.general_rows}
    assert len(replay) + len(data.general_rows) <= 66 and len(data.general_rows) >= 18
    again = load_training_data(args)
    assert [r["id"] for r in again.train_rows] == [r["id"] for r in data.train_rows]  # seeded
    more = load_training_data(DataArguments(data_path=str(SAMPLE), mix_data=str(GENERAL), mix_ratio=0.6))
    assert more.mix["replay_passes"] > 1 and more.mix["replay"] > more.mix["replay_unique"]  # said, not hidden


@pytest.mark.parametrize("flags, message", [
    (["--early_stopping_patience", "2"], "--early_stopping_patience needs --metric_for_best_model"),
    (["--metric_for_best_model", "eval_acuracy"], "(did you mean eval_accuracy?)"),
    (["--max_forgetting", "0.05"], "--max_forgetting needs --general_eval_data"),
    (["--mix_data", str(GENERAL)], "--mix_data and --mix_ratio go together"),
    (["--metric_for_best_model", "eval_accuracy", "--eval_strategy", "no"], "--metric_for_best_model needs"),
], ids=["patience-without-metric", "metric-misspelt", "guard-without-data", "mix-without-ratio", "metric-no-eval"])
def test_recipe_settings_are_checked_before_the_model_loads(flags, message, tiny_dir, tmp_path, capsys):
    code, _, err = run_main(train_args(tiny_dir, tmp_path / "run", *flags), capsys)
    assert code == 2 and err.count("medlora: error:") == 1 and message in err, err[-2000:]


def test_a_sweep_records_completed_and_pruned_trials_and_writes_the_best_config(tiny_dir, tmp_path, capsys,
                                                                              monkeypatch):
    """Three trials; trial 1's accuracy is scripted low, so the median pruner stops it at its first evaluation.
    The table, the chart, best.yaml (a config `train` accepts) and the resumed study are checked."""
    import yaml

    monkeypatch.setenv("COLUMNS", "300")
    scripted_accuracy(monkeypatch, lambda state, args: 0.1 if args.output_dir.endswith("trial-001") else 0.5 + 0.01 * (
        state.global_step + int(args.output_dir[-1])))
    sweep = tmp_path / "sweep"
    space = tmp_path / "space.yaml"
    space.write_text("lora_r: {choices: [2, 4]}\nlearning_rate: {low: 1.0e-3, high: 1.0e-2, log: true}\n")
    argv = ["sweep", "--config", "configs/tiny.yaml", "--space", space, "--n_trials", "3", "--sweep_dir", sweep,
            "--train_flags", f"--model_name_or_path {tiny_dir} --max_steps 4 --eval_steps 2 --save_steps 2 "
                             "--report_to none --audit false --eval_accuracy_samples 4"]
    code, stdout, err = run_main(argv, capsys)
    assert code == 0, err[-3000:]
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    assert [r["state"] for r in rows] == ["complete", "pruned", "complete"]
    assert rows[1]["pruned_at_step"] == "2" and float(rows[1]["last_reported"]) == 0.1
    assert all((sweep / f"trial-00{i}" / "metrics.json").is_file() for i in range(3))  # each a normal run
    assert (sweep / "results.png").stat().st_size > 1000 and "| 1 | pruned |" in (sweep / "results.md").read_text()
    best = yaml.safe_load((sweep / "best.yaml").read_text())
    winner = max((r for r in rows if r["state"] == "complete"), key=lambda r: float(r["eval_accuracy"]))
    assert best["lora_r"] == int(winner["lora_r"]) and best["learning_rate"] == float(winner["learning_rate"])
    assert (sweep / "best.yaml").read_text().startswith(f"# uv run medlora train --config {sweep / 'best.yaml'}")
    assert "config ready in" in stdout
    from medlora.config import parse_config, training_sections

    parse_config(["--config", str(sweep / "best.yaml")], training_sections())  # a config train accepts
    code, stdout, err = run_main(argv, capsys)  # the same command again: the study is complete, nothing reruns
    assert code == 0 and "3 trials done" in stdout and "0 to run" in stdout, err[-2000:]
    argv[argv.index("--n_trials") + 1] = "4"
    space.write_text("lora_r: {choices: [2, 8]}\n")
    code, _, err = run_main(argv, capsys)
    assert code == 2 and "holds a sweep with other space" in err
