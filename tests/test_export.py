"""`medlora export`: the adapter merged into the base, written in the hub's layout, reloaded and checked."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from conftest import run_main
from medlora.cli import main


def layout(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            out.update({k: (fh.get_slice(k).get_dtype(), tuple(fh.get_slice(k).get_shape())) for k in fh.keys()})
    return out


@pytest.fixture(scope="module")
def exported(cli_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "merged"
    run_dir, cache, _, _ = cli_run
    main(["export", "--adapter", str(run_dir / "adapter"), "--output_dir", str(out), "--max_shard_gib", "0.0005"])
    return out, run_dir, cache


def test_export_writes_the_hub_layout_of_the_base(exported):
    out, _, cache = exported
    base = layout(cache)
    assert any(".experts.0.up_proj.weight" in k for k in base) and all(k.startswith(("backbone.", "lm_head")) for k in base)
    assert layout(out) == base  # same tensor names, shapes and dtypes as the base checkpoint (per-expert tensors)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base) and len(set(index["weight_map"].values())) > 1  # sharded
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "medlora_export.json").read_text())
    assert summary["check"]["passed"] and summary["check"]["rel_l2"] <= 1e-4 and summary["layout"]["same_as_base"]
    assert summary["check"]["reload_identical"] and summary["check"]["tensors_compared"] == 49  # fused names
    assert summary["lora_layers_merged"]["routed_experts"] > 0 and summary["lora_layers_merged"]["linear"] > 0
    card = (out / "README.md").read_text()
    assert "Not medical advice" in card and "## This checkpoint (medlora export)" in card


def test_merged_model_equals_base_plus_adapter(exported):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, run_dir, cache = exported
    ids = torch.tensor([[5, 300, 301, 302, 17, 99, 1000, 2]])
    base = AutoModelForCausalLM.from_pretrained(cache)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, run_dir / "adapter")(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
    assert (adapted - base_logits).abs().max() > 1e-3  # the adapter (and so the merge) changes the model
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)


def test_export_never_overwrites_what_it_did_not_write(exported, tmp_path, capsys):
    out, run_dir, _ = exported
    adapter = str(run_dir / "adapter")
    code, _, err = run_main(["export", "--adapter", adapter, "--output_dir", str(out)], capsys)
    assert code == 2 and "already holds the output of medlora export" in err and "--overwrite" in err
    code, _, err = run_main(["export", "--adapter", adapter, "--output_dir", str(run_dir)], capsys)
    assert code == 2 and "holds the input" in err  # the run dir (the adapter's own) is never written into
    again = tmp_path / "again"
    shutil.copytree(out, again)
    (again / "notes.txt").write_text("mine")
    code, _, err = run_main(["export", "--adapter", adapter, "--output_dir", str(again), "--overwrite", "true"], capsys)
    assert code == 2 and "did not write (notes.txt)" in err and (again / "notes.txt").read_text() == "mine"
    (again / "notes.txt").unlink()
    code, out_text, err = run_main(["export", "--adapter", adapter, "--output_dir", str(again), "--overwrite", "true",
                               "--check_examples", "0"], capsys)
    assert code == 0 and "reload check skipped" in out_text, err
    code, _, err = run_main(["export", "--adapter", str(tmp_path), "--output_dir", str(tmp_path / "x")], capsys)
    assert code == 2 and "no adapter_config.json" in err
    # a 4-bit run's adapter merges into the real bf16 weights, never into NF4-rounded ones
    code, _, err = run_main(["export", "--adapter", adapter, "--output_dir", str(tmp_path / "q"), "--load_in_4bit",
                             "true"], capsys)
    assert code == 2 and "never to NF4-rounded ones" in err and not (tmp_path / "q").exists()


def test_bf16_export_is_within_the_stated_tolerance(cli_run, tmp_path, capsys):
    """A bf16 base (the real checkpoint's dtype): merged once-rounded weights vs the unmerged bf16 path."""
    from safetensors.torch import load_file, save_file

    run_dir, cache, _, _ = cli_run
    base = tmp_path / "tiny-bf16"
    shutil.copytree(cache, base)
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(base / "model.safetensors").items()}
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    code, out_text, err = run_main(["export", "--adapter", str(run_dir / "adapter"), "--model_name_or_path", str(base),
                               "--output_dir", str(tmp_path / "merged")], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "merged" / "medlora_export.json").read_text())
    assert summary["dtype"] == "torch.bfloat16" and layout(tmp_path / "merged") == layout(base)
    print("bf16 export check:", summary["check"])
    assert summary["check"]["passed"] and summary["check"]["reload_identical"] and summary["check"]["tolerance"] == 0.5
    assert summary["check"]["top1_agreement"] >= 0.9 and summary["check"]["rel_l2"] < 5e-2  # measured 0.98 / 1.3e-2
