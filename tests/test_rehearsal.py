"""`medlora rehearse` on the tiny model: the whole recipe as separate processes, every phase in one JSON."""

import json

from conftest import SAMPLE, run_cli


def test_rehearsal_trains_stops_resumes_evaluates_and_exports(tmp_path):
    proc = run_cli(["rehearse", "--train_config", "configs/tiny.yaml", "--model_name_or_path", "tiny",
                    "--data_path", str(SAMPLE), "--eval_questions", "12", "--max_steps", "8", "--eval_steps", "4",
                    "--save_steps", "4", "--sigterm_at_step", "3", "--work_dir", str(tmp_path / "work"),
                    "--export_dir", str(tmp_path / "merged"), "--results_dir", str(tmp_path / "results"),
                    "--train_flags", f"--tiny_cache_dir {tmp_path / 'tiny'}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = (tmp_path / "results").glob("*-rehearsal-tiny.json")
    result = json.loads(path.read_text())
    first, second = result["commands"]["train_until_sigterm"], result["commands"]["resume_to_end"]
    assert first["exit_code"] == 143 and "sigterm_to_exit_s" in first and second["exit_code"] == 0
    stopped_at = first["phases"]["steps"]["n"]
    assert 3 <= stopped_at < 8 and first["phases"]["saves"][-1]["step"] == stopped_at  # saved where it stopped
    assert second["phases"]["resume_from"]["checkpoint"] == f"checkpoint-{stopped_at}"
    assert second["phases"]["first_step"]["step"] == stopped_at + 1  # resumed, not restarted
    assert result["metrics"]["global_steps"] == 8 and result["metrics"]["model_card"]
    evals = first["phases"]["evals"] + second["phases"]["evals"]
    assert {e["step"] for e in evals} >= {4, 8} and all(e["accuracy_n"] == 12 for e in evals)
    assert all(s["bytes"] > 0 and s["seconds"] >= 0 for s in first["phases"]["saves"] + second["phases"]["saves"])
    assert result["eval"]["n"] == 12 and result["export"]["check"]["passed"] and result["export"]["layout"]["same_as_base"]
    assert result["sizes"]["adapter_dir"] > 0 and result["sizes"]["export_dir"] > result["sizes"]["adapter_dir"]
    assert set(result["targets"]) == {"checkpoint_save_s", "resume_to_first_new_step_s", "accuracy_eval_500_s"}
    assert result["failed"] is None and result["split"]["eval"] == 12
