"""Execute notebooks/01-05 top to bottom with nbclient and check their key outputs.

The kernel is the kernelspec "python3". jupyter_client starts it with the interpreter running these tests
(`sys.executable`, i.e. the project venv), and `test_kernel_is_this_python_and_cwd_is_repo_root` checks that.
The notebooks run with the repo root as working directory. Notebook 03 trains the tiny model for 30 steps and
writes outputs/notebook-03 (git-ignored), so these tests take a few minutes on 2 CPU cores. Notebook 04 trains with
Unsloth only on a CUDA GPU; on CPU it skips training and shows the committed benchmark results.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
DEV = ROOT.parent / "shared" / "data" / "medmcqa" / "dev.jsonl"  # the path notebook 01 reads, if present
CELL_TIMEOUT = 600


@pytest.fixture(autouse=True)
def inline_plots(monkeypatch):
    # The kernel inherits this environment; an inherited MPLBACKEND (e.g. Agg) would stop plots from being output.
    monkeypatch.delenv("MPLBACKEND", raising=False)


def execute(nb, cwd: Path = ROOT):
    """Run every cell in a fresh python3 kernel; nbclient raises CellExecutionError at the first failing cell."""
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def run_notebook(name: str, cwd: Path = ROOT):
    return execute(nbformat.read(NOTEBOOKS / name, as_version=4), cwd)


def output_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif out.output_type == "error":
                parts.append("\n".join(out.traceback))
            else:
                data = out.get("data", {})
                parts += [data.get("text/plain", ""), data.get("text/html", ""), data.get("text/markdown", "")]
    return "\n".join(parts)


def image_count(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{name}: cells {dirty} hold outputs; clear them before committing"


def test_kernel_is_this_python_and_cwd_is_repo_root():
    """Each notebook's first code cell, started from notebooks/, moves to the repo root; the kernel is this venv."""
    cells = []
    for path in sorted(NOTEBOOKS.glob("0*.ipynb")):
        first = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        cells += [nbformat.v4.new_code_cell("import os\nos.chdir(%r)" % str(NOTEBOOKS)), first]
    cells.append(nbformat.v4.new_code_cell("import json, os, sys\nprint(json.dumps([sys.prefix, os.getcwd()]))"))
    nb = execute(nbformat.v4.new_notebook(cells=cells), cwd=NOTEBOOKS)
    prefix, cwd = json.loads(nb.cells[-1].outputs[0].text)
    assert Path(prefix).resolve() == Path(sys.prefix).resolve(), f"kernel runs {prefix}, tests run {sys.prefix}"
    assert Path(cwd).resolve() == ROOT.resolve()
    assert len(cells) == 11  # five notebooks


@pytest.mark.slow
def test_01_data_exploration():
    nb = run_notebook("01_data_exploration.ipynb")
    text = output_text(nb)
    assert "medmcqa_sample.jsonl: read 72 rows" in text
    assert "style=plain" in text and "style=chat" in text and "«" in text  # both prompt styles, trained span marked
    assert "sample+broken:1002: field 'cop'" in text  # the validation demo reports file:line: field
    if DEV.is_file():
        assert image_count(nb) >= 2
        assert "as evaluation data" in text
        # aggregates only: no question of the real dev split may appear in the outputs
        questions = [json.loads(line).get("question") or "" for line in DEV.read_text(encoding="utf-8").splitlines()
                     if line.strip()]
        leaked = [q for q in questions if len(q.strip()) >= 25 and q.strip() in text]
        assert not leaked, f"{len(leaked)} dev questions appear in notebook 01's outputs"
    else:
        assert image_count(nb) >= 1
        assert "not found: skipping the real dev split" in text


@pytest.mark.slow
def test_02_model_loading():
    nb = run_notebook("02_model_loading.ipynb")
    text = output_text(nb)
    assert "MEM*EM" in text  # config.hybrid_override_pattern of the tiny model
    assert "NemotronHExperts" in text  # module-kinds table
    assert "LoRA-wrapped modules" in text and "experts.up_proj" in text  # print_lora_table
    assert "outproj_weight=self.out_proj.weight" in text  # the fused kernel call shown from the installed source
    assert "self.out_proj(scan_output" in text  # and the PyTorch path that calls the module
    assert text.count("is incompatible with Mamba-based models") == 2  # PEFT refuses out_proj and conv1d
    assert text.count("medlora refuses") == 2


@pytest.mark.slow
def test_03_training_writes_adapter_and_comparison():
    out = ROOT / "outputs" / "notebook-03"
    started = time.time()
    nb = run_notebook("03_training.ipynb")
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.json",
                 "eval/summary.json", "eval/predictions.jsonl"):
        path = out / name
        assert path.is_file(), f"{path} missing"
        assert path.stat().st_mtime >= started - 1, f"{path} was not written by this run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_steps"] == 30
    assert any("loss" in entry for entry in metrics["log_history"])
    assert any("eval_loss" in entry for entry in metrics["log_history"])
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["n"] == metrics["eval_n"]
    assert set(summary["per_subject"]) == set(summary["base"]["per_subject"])
    # run_eval on the saved adapter scores the held-out questions exactly as train() did in memory
    assert summary["accuracy"] == pytest.approx(metrics["eval_accuracy"], abs=1e-9)
    assert summary["base"]["accuracy"] == pytest.approx(metrics["base_eval_accuracy"], abs=1e-9)
    assert image_count(nb) >= 2  # loss / accuracy / general accuracy curves, per-subject comparison
    # the careful recipe of configs/tiny-careful.yaml: best checkpoint kept, forgetting guard, replay mixture
    best = metrics["best_checkpoint"]
    assert best["metric"] == "eval_accuracy" and best["adapter_is_best"] and best["step"] in (10, 20, 30)
    evaluated = {e["step"]: e["eval_accuracy"] for e in metrics["log_history"] if "eval_accuracy" in e}
    assert best["value"] == max(evaluated[s] for s in (10, 20, 30))
    assert metrics["forgetting"]["n"] > 0 and metrics["forgetting"]["max_forgetting"] == 0.05
    assert any("eval_general_accuracy" in e for e in metrics["log_history"])
    assert metrics["data_mix"]["replay"] > 0
    recipe = outputs_of(nb, "03-recipe")
    assert "best_checkpoint" in recipe and f"'checkpoint': '{best['checkpoint']}'" in recipe


@pytest.mark.slow
def test_05_sweep_runs_two_trials_and_writes_the_table_chart_and_best_config():
    import csv

    import yaml

    out = ROOT / "outputs" / "notebook-05"
    started = time.time()
    nb = run_notebook("05_sweep.ipynb")
    text = output_text(nb)
    assert "Traceback" not in text
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 and all(r["state"] in ("complete", "pruned") for r in rows), rows
    for row in rows:
        run_dir = ROOT / row["run_dir"]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["global_steps"] <= 10 and (run_dir / "metrics.json").stat().st_mtime >= started - 1
    best = yaml.safe_load((out / "best.yaml").read_text())
    space = yaml.safe_load((ROOT / "configs" / "sweep-tiny.yaml").read_text())
    assert set(space) <= set(best) and best["lora_r"] in space["lora_r"]["choices"]
    assert image_count(nb) >= 1 and "| trial | state |" in text


def outputs_of(nb, cell_id: str) -> str:
    cell = next(c for c in nb.cells if c.get("id") == cell_id)
    return output_text(nbformat.v4.new_notebook(cells=[cell]))


@pytest.mark.slow
def test_04_unsloth_training_cpu_skips_training_and_shows_benchmark():
    import torch

    out = ROOT / "outputs" / "notebook-04"
    started = time.time()
    nb = run_notebook("04_unsloth_training.ipynb")
    text = output_text(nb)
    assert "Traceback" not in text
    if torch.cuda.is_available():
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["backend"] == "unsloth" and metrics["global_steps"] == 30
        assert (out / "metrics.json").stat().st_mtime >= started - 1
    else:
        assert "cannot train here: the Unsloth backend needs an NVIDIA GPU" in text
        # the exact refusal of medlora.backends.require_unsloth(), printed from the caught MedloraError
        assert "--backend unsloth needs an NVIDIA GPU (Unsloth imports only with CUDA)" in text
        assert text.count("skipped: no Unsloth on this machine") == 3  # the three training cells
    # hardware and versions of the committed bench files, read from their JSON
    assert "H100" in text and "unsloth" in text
    table = outputs_of(nb, "04-11")  # the benchmark table: one row per (file, backend)
    assert "tokens_per_s" in table and "epoch_hours_medmcqa_train" in table
    assert "unsloth" in table and "hf" in table
    report = outputs_of(nb, "04-08")  # backend_report from the JSON
    assert "NemotronHBlock" in report and "ParamWrapper" in report
    assert "NemotronHMamba2Mixer replaced: False" in outputs_of(nb, "04-09")
    assert image_count(nb) >= 1  # the grouped bar chart
