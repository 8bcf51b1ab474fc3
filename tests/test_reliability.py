"""Reliability, class by class: every option's boundary values, the readers' odd inputs, prepared datasets and
adapters checked before they are used, LoRA targets that match nothing, YAML aliases, the CLI's messages and
`--help` of every command. (Data files' row-level cases are in test_bad_input.py; ownership of output dirs and
resume fingerprints in test_safety.py; the random inputs in test_fuzz.py.)"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import typing
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE, run_main
from medlora.errors import ConfigError

# ---------------------------------------------------------------- every field, with its boundary values


def _sections() -> list[type]:
    from medlora import cli, config
    from medlora.benchmark import BenchArguments
    from medlora.export import ExportArguments
    from medlora.loss_bench import LossBenchArguments
    from medlora.modelcard import ReportArguments
    from medlora.rehearsal import RehearsalArguments
    from medlora.sweep import SweepArguments

    return [config.ModelArguments, config.LoraArguments, config.DataArguments, config.RunArguments,
            config.EvalArguments, config.PrepareArguments, cli.AskArguments, cli.InspectArguments,
            cli.BuildTinyArguments, cli.EnvArguments, cli.SetupKernelsArguments, BenchArguments, LossBenchArguments,
            ExportArguments, RehearsalArguments, ReportArguments, SweepArguments]


REQUIRED = {"AskArguments": {"question": "Which nerve?", "options": ["a", "b", "c", "d"]}}
# values a boundary walk offers that are legal on purpose (everything else must be refused, naming the option)
ACCEPTED = {
    ("LoraArguments", "lora_dropout"): [0.0],
    ("LoraArguments", "lora_target_modules"): [[]],  # with target_parameters set; both empty is refused
    ("LoraArguments", "lora_target_parameters"): [[]],  # "pass [] to leave the experts frozen"
    ("DataArguments", "split_seed"): [0],
    ("RunArguments", "fast_levers"): [[]],  # fast with every lever off: the plain fused path
    ("RunArguments", "fast_checkpoint_blocks"): [[]],
    ("RunArguments", "eval_accuracy_samples"): [0],  # 0: every eval question
    ("EvalArguments", "bootstrap_samples"): [0],  # 0: no interval
    ("PrepareArguments", "test_fraction"): [0.0],  # no test split
    ("AskArguments", "question"): ["", " "],  # checked as a row: "field 'question': is empty"
    ("BenchArguments", "bench_warmup_steps"): [0],
    ("BenchArguments", "backend_batch_size"): [[]],
    ("BenchArguments", "backend_gradient_checkpointing"): [[]],
    ("BenchArguments", "seed"): [0],
    ("BenchArguments", "profile_step"): [0],  # 0: the last timed step
    ("BenchArguments", "tag"): [""],
    ("LossBenchArguments", "warmup"): [0],
    ("LossBenchArguments", "seed"): [0],
    ("LossBenchArguments", "tag"): [""],
    ("ExportArguments", "check_examples"): [0],  # 0: no reload check
    ("RehearsalArguments", "train_flags"): ["", " "],
    ("RehearsalArguments", "tag"): [""],
    ("RunArguments", "early_stopping_patience"): [0],  # 0: off
    ("RunArguments", "early_stopping_threshold"): [0.0],
    ("RunArguments", "max_forgetting"): [0.0],  # any drop stops the run
    ("DataArguments", "mix_ratio"): [0.0],  # no replay
    ("SweepArguments", "seed"): [0],
    ("SweepArguments", "pruner_startup_trials"): [0],
    ("SweepArguments", "pruner_warmup_steps"): [0],
    ("SweepArguments", "train_flags"): ["", " "],
}
SFT_ACCEPTED = {"max_steps": ["-1"], "seed": ["0"], "data_seed": ["0"], "dataloader_num_workers": ["0"],
                "local_rank": ["-1", "0"], "torch_empty_cache_steps": ["1000000000000"]}


def _boundary_values(kind: str) -> list:
    if "bool" in kind:
        return []
    if "list" in kind:
        return [[], [""], ["x" * 300]]
    if "float" in kind:
        return [-1.0, 0.0, float("nan"), float("inf")]
    if "int" in kind:
        return [-1, 0, 10**12]
    return ["", " ", "x" * 5000]


def _names_option(message: str, field: dataclasses.Field) -> bool:
    options = [field.name, *(a.lstrip("-") for a in field.metadata.get("aliases", []))]
    return any(name in message for name in options)


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def test_every_field_refuses_its_boundary_values_or_accepts_them_on_purpose():
    """Each option of each command, at -1 / 0 / 10**12, -1.0 / 0.0 / nan / inf, "" / " " / 5,000 characters, [] /
    [""]: refused at start-up with a message that names it (and echoes at most a bounded value), or listed above
    as legal. A new option without a validator fails here."""
    problems = []
    for section in _sections():
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            for value in _boundary_values(str(hints[f.name])):
                where = f"{section.__name__}.{f.name}={str(value)[:20]!r}"
                try:
                    obj = section(**{**REQUIRED.get(section.__name__, {}), f.name: value})
                    obj.validate(None) if section.__name__ == "RunArguments" else obj.validate()
                except ConfigError as err:
                    if not _names_option(str(err), f):
                        problems.append(f"{where}: refused without naming the option: {str(err)[:200]}")
                    elif len(str(err)) > 600:
                        problems.append(f"{where}: message of {len(str(err))} characters (echo not cut)")
                    continue
                except Exception as err:  # noqa: BLE001 - what the walk is for
                    problems.append(f"{where}: {type(err).__name__}: {str(err)[:200]}")
                    continue
                legal = ACCEPTED.get((section.__name__, f.name), [])
                if not any(_same(value, ok) for ok in legal) and not (isinstance(value, (str, list)) and
                                                                     len(str(value)) > 200):
                    problems.append(f"{where}: accepted")
    assert not problems, "\n".join(problems)


def test_every_numeric_sft_option_refuses_its_boundary_values_through_the_parser():
    """The same walk for TRL's SFTConfig, through the real parser (its own __post_init__ checks included)."""
    from trl import SFTConfig

    from medlora.config import parse_config, training_sections, validate

    hints = typing.get_type_hints(SFTConfig)
    problems = []
    for f in dataclasses.fields(SFTConfig):
        kind = str(hints[f.name])
        if any(word in kind.lower() for word in ("bool", "dict", "list")) or not any(t in kind for t in ("int", "float")):
            continue
        for value in (["-1", "nan", "inf"] if "float" in kind else ["-1", "0", "1000000000000"]):
            try:
                validate(*parse_config(["--output_dir", "/tmp/unused", f"--{f.name}", value], training_sections()))
            except ConfigError as err:
                if f.name not in str(err):
                    problems.append(f"--{f.name} {value}: refused without naming it: {str(err)[:200]}")
                continue
            except Exception as err:  # noqa: BLE001
                problems.append(f"--{f.name} {value}: {type(err).__name__}: {str(err)[:200]}")
                continue
            if value not in SFT_ACCEPTED.get(f.name, []):
                problems.append(f"--{f.name} {value}: accepted")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- readers: what the row cases cannot show


def test_an_unreadable_file_is_one_line_naming_it(tmp_path, monkeypatch):
    from medlora.data import DataError, load_medmcqa

    path = tmp_path / "data.jsonl"
    path.write_text(SAMPLE.read_text())

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)  # tests run as root, for whom chmod 000 changes nothing
    with pytest.raises(DataError, match=rf"{path}: cannot read it \(permission denied: {path}\)"):
        load_medmcqa(str(path))


def test_a_file_name_that_is_not_utf8_is_shown_escaped_and_written_safely(tmp_path):
    from medlora.data import load_medmcqa, write_skipped

    name = os.fsdecode(b"donn\xe9es.jsonl")  # Latin-1 bytes in the name: a surrogate-escaped str in Python
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:6]]
    rows[2]["opa"] = None
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept, report = load_medmcqa(str(tmp_path / name), skip_invalid=True)
    assert len(kept) == 5 and "donn\\xe9es.jsonl:3: field 'opa': is null" in str(report.issues[0])
    print(report.summary())  # stdout is strict UTF-8: a raw surrogate here would raise
    skipped = write_skipped(report, tmp_path / "out").read_text(encoding="utf-8")
    assert json.loads(skipped)["source"].endswith("donn\\xe9es.jsonl")
    assert all(r["source"].encode("utf-8") for r in kept)  # Arrow and JSON writers take every row


def test_a_lone_surrogate_is_refused_in_evaluation_too_and_kept_exactly_in_skipped_jsonl(tmp_path):
    from medlora.data import load_medmcqa, write_skipped

    lines = SAMPLE.read_text().splitlines()[:5]
    lines[1] = lines[1].replace('"question": "', '"question": "\\ud83d ', 1)  # half of an emoji's escape
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    rows, report = load_medmcqa(str(tmp_path / "data.jsonl"), evaluation=True, skip_invalid=True)
    assert len(rows) == 4 and "data.jsonl:2: field 'question': holds a lone surrogate" in str(report.issues[0])
    record = json.loads(write_skipped(report, tmp_path / "out").read_text(encoding="utf-8"))
    assert record["row"]["question"].startswith("\ud83d ")  # the row as read, via JSON's own \ud83d escape


def test_identical_questions_under_two_subjects_stay_in_one_split():
    from medlora.data import normalise_key, split_rows

    rows = []
    for i in range(60):
        subject = ["Anatomy", "Physiology", "Surgery"][i % 3]
        rows.append({"question": f"Stem {i // 2}?", "subject_name": subject, "cop": i % 4, "line": i + 1,
                     "source": "s", "opa": f"a{i}", "opb": "b", "opc": "c", "opd": "d"})
    for seed in range(20):  # every pair split by subject before; now the pair moves together, for every seed
        parts = split_rows(rows, 0.2, seed)
        owner = {}
        for name, part in parts.items():
            for row in part:
                assert owner.setdefault(normalise_key(row["question"]), name) == name
        assert sum(len(p) for p in parts.values()) == 60


# ---------------------------------------------------------------- prepared datasets


@pytest.fixture(scope="module")
def prepared(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "prepared"
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "medlora.cli", "prepare", "--data", str(SAMPLE), "--output_dir",
                           str(out), "--model_name_or_path", str(tiny_dir)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _damaged(prepared: Path, tmp: Path, damage) -> Path:
    from datasets import load_from_disk

    copy = tmp / "damaged"
    splits = load_from_disk(str(prepared))
    splits = damage(splits) or splits
    splits.save_to_disk(str(copy))
    shutil.copy(prepared / "prepare_summary.json", copy / "prepare_summary.json")
    return copy


def _cop_seven(splits):
    splits["train"] = splits["train"].map(lambda r, i: {"cop": 7 if i == 2 else r["cop"]}, with_indices=True)


def _no_question(splits):
    splits["eval"] = splits["eval"].remove_columns("question")


def _no_summary(splits):
    return None


@pytest.mark.parametrize("damage, message", [
    (_cop_seven, "split 'train' row 3: field 'cop': must be 0-3 in a prepared dataset (A-D), got 7"),
    (_no_question, "split 'eval' lacks column(s) ['question']"),
    (_no_summary, "an incomplete prepared dataset (no prepare_summary.json"),
], ids=["cop-out-of-range", "column-missing", "prepare-did-not-finish"])
def test_a_damaged_prepared_dataset_is_refused_like_a_raw_file(prepared, tiny_dir, tmp_path, capsys, damage,
                                                                message):
    data = _damaged(prepared, tmp_path, damage)
    if damage is _no_summary:
        (data / "prepare_summary.json").unlink()
    code, _, err = run_main(["train", "--config", "configs/tiny.yaml", "--model_name_or_path", tiny_dir, "--data",
                             data, "--output_dir", tmp_path / "run"], capsys)
    assert code == 2 and err.count("medlora: error:") == 1 and message in err, err[-2000:]
    assert not (tmp_path / "run" / "adapter").exists()


def test_eval_scores_a_prepared_dir_held_out_split(prepared, tiny_dir, tmp_path, capsys):
    code, out, err = run_main(["eval", "--model_name_or_path", tiny_dir, "--data", prepared, "--output_dir",
                               tmp_path / "ev", "--bootstrap_samples", "0"], capsys)
    assert code == 0, err[-2000:]
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    held_out = json.loads((prepared / "prepare_summary.json").read_text())["splits"]["eval"]["rows"]
    assert summary["n"] == held_out and f"{prepared}[eval]" in out


# ---------------------------------------------------------------- adapters, checked before loading


@pytest.fixture(scope="module")
def good_adapter(tiny_dir, tmp_path_factory):
    from peft import get_peft_model

    from medlora.config import LoraArguments, ModelArguments
    from medlora.model import load_model, lora_config

    model, _ = load_model(ModelArguments(model_name_or_path=str(tiny_dir)))
    out = tmp_path_factory.mktemp("adapter") / "good"
    get_peft_model(model, lora_config(LoraArguments(lora_r=2))).save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tiny_dir)}))
    return out


def _set_config(**changes):
    def damage(folder: Path):
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return damage


def _replace_config(text):
    return lambda folder: (folder / "adapter_config.json").write_text(text)


def _pickle_only(folder: Path):
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04\x95 not loaded")


def _truncated(folder: Path):
    weights = folder / "adapter_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)


def _no_weights(folder: Path):
    (folder / "adapter_model.safetensors").unlink()


ADAPTER_CASES = [
    ("pickle-bin", _pickle_only, "holds adapter_model.bin (a pickle, which can run code when loaded)"),
    ("rank-as-string", _set_config(r="8"), "field 'r' must be int, got '8'"),
    ("targets-a-number", _set_config(target_modules=5), "field 'target_modules' must be list or str or null, got 5"),
    ("alpha-zero", _set_config(lora_alpha=0), "field 'lora_alpha' must be > 0, got 0"),
    ("truncated-safetensors", _truncated, "not a whole safetensors file"),
    ("empty-object", _replace_config("{}"), "no peft_type: not a PEFT adapter config"),
    ("unknown-peft-type", _set_config(peft_type="LOHA"), "peft_type 'LOHA': medlora loads LoRA adapters"),
    ("config-is-a-list", _replace_config("[1, 2]"), "not a PEFT adapter config (a JSON object), got list"),
    ("config-nested-deep", _replace_config("[" * 100_000 + "]" * 100_000), "not a readable JSON file"),
    ("no-weights", _no_weights, "no adapter_model.safetensors beside adapter_config.json"),
]


@pytest.mark.parametrize("command", ["eval", "export", "ask"])
@pytest.mark.parametrize("kind, damage, message", ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
def test_a_bad_adapter_is_refused_in_one_line_before_anything_loads(good_adapter, tiny_dir, tmp_path, capsys,
                                                                    monkeypatch, command, kind, damage, message):
    adapter = tmp_path / "adapter"
    shutil.copytree(good_adapter, adapter)
    damage(adapter)
    import medlora.model

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the adapter was checked")

    monkeypatch.setattr(medlora.model, "load_model", no_loading)
    args = {"eval": ["eval", "--model_name_or_path", tiny_dir, "--data", SAMPLE, "--output_dir", tmp_path / "ev",
                     "--adapter", adapter],
            "export": ["export", "--adapter", adapter, "--output_dir", tmp_path / "merged", "--model_name_or_path",
                       tiny_dir],
            "ask": ["ask", "Which nerve?", "--options", "a", "b", "c", "d", "--model_name_or_path", tiny_dir,
                    "--adapter", adapter]}[command]
    code, _, err = run_main(args, capsys)
    assert code == 2 and err.count("medlora: error:") == 1 and message in err, err[-2000:]
    assert not (tmp_path / "merged").exists()


# ---------------------------------------------------------------- nothing ambiguous passes silently


def test_a_lora_target_that_matches_no_module_is_refused_with_a_suggestion(tiny, capsys):
    from medlora.config import LoraArguments
    from medlora.model import apply_lora, check_lora_targets

    model = tiny[0]
    with pytest.raises(ConfigError, match=r"--lora_target_modules: 'q_prj' \(did you mean 'q_proj'\?\) match"):
        check_lora_targets(model, LoraArguments(lora_target_modules=["q_prj", "k_proj"]))
    with pytest.raises(ConfigError, match=r"--lora_target_parameters: 'experts.up_prj' \(did you mean "
                                          r"'experts.up_proj'\?\)"):
        check_lora_targets(model, LoraArguments(lora_target_parameters=["experts.up_prj"]))
    check_lora_targets(model, LoraArguments())  # the defaults all match
    assert apply_lora is not None


def test_a_yaml_alias_is_refused_before_it_expands(tmp_path, capsys):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
    bomb += "lora_target_modules: *i\n"
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb)
    code, _, err = run_main(["train", "--config", path, "--output_dir", tmp_path / "run"], capsys)
    assert code == 2 and f"{path}:2: YAML aliases (*name) are not accepted" in err and len(err) < 400, err[:2000]


def test_config_given_twice_is_named_as_such(tmp_path, capsys):
    code, _, err = run_main(["train", "--config", "configs/tiny.yaml", "--config", "configs/tiny.yaml"], capsys)
    assert code == 2 and "--config is given 2 times (configs/tiny.yaml, configs/tiny.yaml)" in err
    assert "did you mean" not in err


@pytest.mark.parametrize("command", sorted(__import__("medlora.cli", fromlist=["COMMANDS"]).COMMANDS))
def test_help_of_every_command_prints_and_does_nothing_else(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main([command, "--help"], capsys)
    assert code == 0 and f"usage: medlora {command}" in out and "Traceback" not in err, (out + err)[-2000:]
    assert list(tmp_path.iterdir()) == []  # build-tiny --help built nothing (once: a dir named --help)


# ---------------------------------------------------------------- what the fuzz suite found, kept as regular tests


@pytest.mark.parametrize("argv, message", [
    (["train", "--deepspeed", "0"], "an option needs a package that is not installed"),  # ImportError in __post_init__
    (["train", "--logging_steps", "inf"], "--logging_steps inf: must be a finite number"),  # OverflowError there
])
def test_options_that_a_library_rejects_late_are_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(argv, capsys)
    assert code == 2 and err.count("medlora: error:") == 1 and message in err, err[-2000:]


# ---------------------------------------------------------------- output file systems: read-only and full


@pytest.fixture
def mounted(tmp_path):
    """A fresh 2 MB tmpfs (needs root, as the CI machine has; skipped elsewhere), unmounted afterwards."""
    import subprocess

    made = []

    def mount(options: str) -> Path:
        point = tmp_path / f"fs{len(made)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=2m,{options}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")
        made.append(point)
        return point

    yield mount
    for point in made:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _fill(point: Path, leave: int) -> None:
    free = os.statvfs(point).f_bavail * os.statvfs(point).f_frsize
    with open(point / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))


def _train_args(tiny_dir, out, *extra):
    return ["train", "--config", "configs/tiny.yaml", "--model_name_or_path", tiny_dir, "--output_dir", out,
            "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no", "--audit", "false",
            "--eval_accuracy_samples", "0", "--report_to", "none", *extra]


def test_a_read_only_file_system_is_refused_before_any_work(mounted, tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    ro = mounted("ro")
    commands = {
        "train": _train_args(tiny_dir, ro / "run"),
        "prepare": ["prepare", "--data", SAMPLE, "--output_dir", ro / "prep", "--model_name_or_path", tiny_dir],
        "eval": ["eval", "--data", SAMPLE, "--output_dir", ro / "ev", "--model_name_or_path", tiny_dir],
        "bench": ["bench", "--data_path", SAMPLE, "--results_dir", ro / "results", "--bench_steps", "1"],
    }
    import medlora.model

    monkeypatch.setattr(medlora.model, "load_model", lambda *a, **k: pytest.fail("loaded a model first"))
    for name, argv in commands.items():
        code, _, err = run_main(argv, capsys)
        assert code == 2 and err.count("medlora: error:") == 1, (name, err[-2000:])
        assert "cannot write there (Read-only file system)" in err, (name, err[-2000:])


def test_a_full_disk_is_one_line_and_never_leaves_an_output_that_passes_as_complete(mounted, tiny_dir, tmp_path,
                                                                                      capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("COLUMNS", "300")
    full = mounted("rw")
    _fill(full, 24 * 1024)  # room for the probe and a few small files, not for a dataset, predictions or adapter
    prep = full / "prep"
    code, _, err = run_main(["prepare", "--data", SAMPLE, "--output_dir", prep, "--model_name_or_path", tiny_dir],
                            capsys)
    assert code == 2 and err.count("medlora: error:") == 1 and "no space left on device" in err, err[-2000:]
    assert not (prep / "prepare_summary.json").exists()
    code, _, err = run_main(_train_args(tiny_dir, tmp_path / "run", "--data", prep), capsys)
    assert code == 2 and ("an incomplete prepared dataset" in err or "without a prepared dataset" in err), err[-2000:]

    for name, argv in {"eval": ["eval", "--data", SAMPLE, "--output_dir", full / "ev", "--model_name_or_path",
                                tiny_dir, "--bootstrap_samples", "0"],
                       "train": _train_args(tiny_dir, full / "run")}.items():
        (full / "filler").unlink()
        _fill(full, 12 * 1024)  # the probe passes; the outputs do not fit
        code, _, err = run_main(argv, capsys)
        assert code == 2 and err.count("medlora: error:") == 1 and "no space left on device" in err.lower(), \
            (name, err[-2000:])
        assert "cannot write there" not in err, (name, err[-2000:])  # failed in the work, not at the probe
        assert "Traceback" not in err
    assert not (full / "ev" / "summary.json").exists() and not (full / "run" / "adapter").exists()
    assert not list(full.glob("*/*.tmp")) and not list(full.glob("*/.adapter.partial"))
