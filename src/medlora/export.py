"""Export stage: `medlora export` merges a LoRA adapter into its base and writes a checkpoint servers read.

    uv run medlora export --adapter outputs/nano-fast/adapter --output_dir outputs/nano-fast-merged

The hub checkpoint stores one tensor per routed expert (`backbone.layers.N.mixer.experts.E.up_proj.weight`);
transformers fuses them into 3-D tensors when it loads and vLLM / SGLang / TGI read the hub layout. So the
merged model is written under the hub's names, shapes and dtypes (`medlora.model.hub_state_dict`), as sharded
safetensors with an index, with config, generation config, tokenizer and a model card (README.md).

Merge precision: every LoRA delta (attention, Mamba in_proj, shared experts, and the routed experts' PEFT
`target_parameters`) is computed in fp32 from the fp32 adapter and added to the base weight in fp32, then rounded
once to the checkpoint's dtype (PEFT's own merge rounds the expert delta to bf16 before adding it).

Check: (1) the written directory, loaded back with `from_pretrained` (the hub layout fused again), holds every
tensor of the merged model bit for bit (integer fingerprints of all tensors); (2) its logits on a few
training-format examples match base + adapter (unmerged, taken before merging): in fp32 within 1e-4 relative
(L2). In bf16 the two are different valid roundings (PEFT's unmerged path rounds the expert LoRA factors to
bf16, the merge rounds W + BA once), and a random-weight MoE amplifies a rounding through its layers and expert
choices (measured on one H200: nano-quarter 0.22 relative / 72 % top-1 agreement, nano-full 0.32 / 99 %), so in
bf16 the logit comparison is a gross-error bound only (relative L2 <= 0.5); the merge maths is checked in fp32
(in CI on the tiny model, on the GPU on nano-quarter). The result is in `medlora_export.json`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medlora.config import ModelArguments
from medlora.errors import ConfigError, MedloraError

# bf16: the merged weight is rounded once (relative error <= 2^-9 per weight), the unmerged path is not, so logits
# differ by rounding; on random-weight models a rounding can also flip a token's top-6 experts.
# relative L2 of the logits against base + adapter: tight in fp32; a gross-error bound in bf16 (see above)
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.5, "float16": 0.5}
MANIFEST = "medlora_export.json"


@dataclass
class ExportArguments:
    adapter: str = field(default="outputs/tiny-run/adapter", metadata={"help": "the adapter dir to merge"})
    output_dir: str = field(default="outputs/merged", metadata={"help": "where the merged checkpoint goes"})
    overwrite: bool = field(default=False, metadata={"help": "replace a previous export in output_dir (only the "
                                                             "files medlora wrote there)"})
    max_shard_gib: float = field(default=5.0, metadata={"help": "largest safetensors shard, GiB (the hub uses 5)"})
    check_examples: int = field(default=4, metadata={"help": "examples whose logits are compared after reloading "
                                                             "(0 skips the check)"})
    check_data: str = field(default="data/sample/medmcqa_sample.jsonl", metadata={
        "help": "MedMCQA-format file the check examples come from"})

    def validate(self) -> None:
        from medlora.config import need_count, need_number, need_text

        for name in ("adapter", "output_dir", "check_data"):
            need_text(getattr(self, name), f"--{name}")
        need_number(self.max_shard_gib, "--max_shard_gib", 0, 10**4, low_open=True)
        need_count(self.check_examples, "--check_examples", 0, 10**4)


def original_layout(path: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of a local (or hub-cached) checkpoint, read from the safetensors headers."""
    from safetensors import safe_open

    folder = Path(path)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(path, local_files_only=True, allow_patterns=["*.json"]))
        except Exception:  # noqa: BLE001 - not cached or not a hub id: there is no original layout to follow
            return {}
    layout = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            for key in fh.keys():
                piece = fh.get_slice(key)
                dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(piece.get_dtype())
                if dtype is not None:
                    layout[key] = (dtype, tuple(piece.get_shape()))
    return layout


@torch.no_grad()
def merge_lora_(model) -> dict[str, int]:
    """Add every LoRA delta of a PEFT model into its base weights (fp32 maths, one rounding); returns counts."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    counts = {"linear": 0, "routed_experts": 0}
    for module in list(model.modules()):
        if not isinstance(module, LoraLayer):
            continue
        active = [a for a in module.active_adapters if a in module.lora_A]
        if len(active) != 1:
            raise MedloraError(f"export: expected one active LoRA adapter, found {active}")
        name = active[0]
        A = module.lora_A[name].weight.float()
        B = module.lora_B[name].weight.float()
        scale = module.scaling[name]
        if isinstance(module, ParamWrapper):
            target = getattr(module.get_base_layer(), module.parameter_name)
            experts = module.num_experts
            A = A.reshape(experts, -1, A.shape[-1])  # (experts, rank, in)
            B = B.reshape(B.shape[0], -1, experts)  # (out, rank, experts)
            pattern = "o r e, e r i -> e o i" if module._did_swap_in_out_features else "o r e, e r i -> e i o"
            delta = torch.einsum(pattern, B, A) * scale
            counts["routed_experts"] += 1
        else:
            if getattr(module, "fan_in_fan_out", False):
                raise MedloraError("export: fan_in_fan_out LoRA layers are not supported")
            target = module.get_base_layer().weight
            delta = (B @ A) * scale
            counts["linear"] += 1
        if delta.shape != target.shape:
            raise MedloraError(f"export: LoRA delta {tuple(delta.shape)} does not fit its weight {tuple(target.shape)}")
        target.copy_((target.float() + delta.to(target.device)).to(target.dtype))
        del delta
    return counts


def _check_batch(tokenizer, options, data: str, n: int):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from medlora.data import load_medmcqa
    from medlora.formatting import encode_example

    rows, _ = load_medmcqa(data, evaluation=True)
    examples = [{"input_ids": encode_example(tokenizer, r, options)["input_ids"]} for r in rows[:n]]
    if not examples:
        raise MedloraError(f"--check_data {data}: no rows")
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(examples)
    return batch["input_ids"], batch["attention_mask"]


@torch.no_grad()
def _logits(model, ids, mask) -> torch.Tensor:
    device = next(model.parameters()).device
    model.eval()
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    return out[mask.bool().to(device)].cpu()  # real positions only


def export(model_args: ModelArguments, args: ExportArguments) -> dict[str, Any]:
    from medlora import runinfo
    from medlora.evaluate_cli import eval_format, load_for_eval
    from medlora.model import resolve_model_path, save_hub_layout

    out = Path(args.output_dir)
    args.validate()
    if model_args.load_in_4bit:
        raise ConfigError("export --load_in_4bit: the merge adds the adapter to the real base weights (in fp32, rounded "
                          "once to the checkpoint's dtype, bf16 for Nemotron-3-Nano), never to NF4-rounded ones; the "
                          "adapter of a --load_in_4bit run is an ordinary adapter for the bf16 base: drop the flag")
    from medlora.evaluate import read_adapter
    from medlora.outputs import claim_output_dir

    read_adapter(args.adapter)  # before the output dir is touched or a model loaded

    claim_output_dir(out, "export", args.overwrite, inputs=[args.adapter, model_args.model_name_or_path])
    started, phases = time.time(), {}
    base_path = resolve_model_path(model_args)
    layout = original_layout(base_path)
    dtypes = {name: dtype for name, (dtype, _) in layout.items()}
    if dtypes and model_args.torch_dtype == "auto":  # merge in the dtype the checkpoint is stored in
        from collections import Counter

        main_dtype = Counter(dtypes.values()).most_common(1)[0][0]
        model_args = ModelArguments(**{**model_args.__dict__, "torch_dtype": str(main_dtype).replace("torch.", "")})
    model, tokenizer = load_for_eval(model_args, args.adapter)
    phases["load_s"] = round(time.time() - started, 1)
    options, fmt = eval_format(_data_args(), args.adapter, tokenizer, model)
    reference = None
    if args.check_examples:
        ids, mask = _check_batch(tokenizer, options, args.check_data, args.check_examples)
        reference = _logits(model, ids, mask)
    t = time.time()
    counts = merge_lora_(model)
    base = model.unload()  # PEFT wrappers removed; the merged weights stay
    phases["merge_s"] = round(time.time() - t, 1)
    out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    fingerprints = state_fingerprints(base) if reference is not None else None
    written = save_hub_layout(base, out, int(args.max_shard_gib * 2**30), dtypes or None)
    dtype = next(base.parameters()).dtype
    base.config.dtype = dtype
    base.config.save_pretrained(out)
    base.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    phases["write_s"] = round(time.time() - t, 1)
    del model, base
    import gc

    gc.collect()  # PEFT wrappers hold reference cycles: free the 63 GB before the reload check
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    names = {}
    from safetensors import safe_open

    for file in written["files"]:
        with safe_open(str(out / file), "pt") as fh:
            names.update({k: (fh.get_slice(k).get_dtype(), tuple(fh.get_slice(k).get_shape())) for k in fh.keys()})
    layout_check = None
    if layout:
        want = {k: (str(d).replace("torch.", ""), s) for k, (d, s) in layout.items()}
        got = {k: ({"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[d], s) for k, (d, s) in names.items()}
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        differ = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        layout_check = {"tensors": len(got), "same_as_base": not (missing or extra or differ),
                        "missing": missing[:5], "extra": extra[:5], "differ": differ[:5]}
    check = None
    if reference is not None:
        t = time.time()
        check = check_reload(out, reference, ids, mask, dtype, fingerprints)
        phases["reload_check_s"] = round(time.time() - t, 1)
    files = sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
    summary = {
        "adapter": str(Path(args.adapter).resolve()), "base": model_args.model_name_or_path, "dtype": str(dtype),
        "merge": "fp32 delta added in fp32, rounded once to the checkpoint dtype", "lora_layers_merged": counts,
        "tensors": written["tensors"], "bytes": written["bytes"], "shards": written["files"],
        "layout": layout_check, "check": check, "format": fmt, "phases": phases,
        "wall_s": round(time.time() - started, 1), "versions": runinfo.versions(), "hardware": runinfo.hardware(),
        "files": [f for f in files if not f.startswith(".")] + ["README.md"],
    }
    (out / "README.md").write_text(export_card(summary, Path(args.adapter)), encoding="utf-8")
    (out / MANIFEST).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if layout_check and not layout_check["same_as_base"]:
        raise MedloraError(f"export: {out} differs from the base checkpoint's layout ({layout_check}); see {MANIFEST}")
    if check and not check["passed"]:
        raise MedloraError(f"export: the reloaded {out} fails its check ({check['why']}); see {MANIFEST}")
    return summary


def _data_args():
    from medlora.config import DataArguments

    return DataArguments()


@torch.no_grad()
def state_fingerprints(model, chunk: int = 1 << 26) -> dict[str, tuple[int, int]]:
    """Exact integer fingerprints (sum, position-weighted sum of the raw bits) of every tensor, computed on the
    tensor's device in chunks: equal fingerprints = the same bits, whatever the float values."""
    views = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    out = {}
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().contiguous().view(-1).view(views[tensor.element_size()])
        total = weighted = 0
        for start in range(0, flat.numel(), chunk):
            part = flat[start:start + chunk].to(torch.int64)
            weights = torch.arange(start, start + part.numel(), device=part.device) % 65521 + 1
            total += int(part.sum())
            weighted += int((part * weights).sum())
        out[name] = (total, weighted)
    return out


def check_reload(out: Path, reference: torch.Tensor, ids, mask, dtype,
                 fingerprints: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """Load the written directory with from_pretrained: same bits as the merged model, logits as base + adapter."""
    from transformers import AutoModelForCausalLM

    device_map = {"": 0} if torch.cuda.is_available() else None
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, device_map=device_map, use_safetensors=True)
    got = _logits(model, ids, mask)
    differing = None
    if fingerprints is not None:
        again = state_fingerprints(model)
        differing = sorted(k for k in fingerprints.keys() | again.keys() if fingerprints.get(k) != again.get(k))
    del model
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    rel = float((got - reference).norm() / reference.norm().clamp_min(1e-12))
    top1 = float((got.argmax(-1) == reference.argmax(-1)).float().mean())
    name = str(dtype).replace("torch.", "")
    tolerance = TOLERANCE[name]
    why = [] if rel <= tolerance else [f"logits: relative L2 {rel:.2e} > {tolerance:g}, top-1 agreement {top1:.3f}"]
    if differing:
        why.append(f"{len(differing)} tensors differ from the merged model after reloading, e.g. {differing[:3]}")
    return {"positions": int(reference.shape[0]), "rel_l2": rel, "max_abs": float((got - reference).abs().max()),
            "top1_agreement": top1, "tolerance": tolerance,
            "reload_identical": None if differing is None else not differing,
            "tensors_compared": None if fingerprints is None else len(fingerprints),
            "passed": not why, "why": "; ".join(why) or None}


def export_card(summary: dict[str, Any], adapter: Path) -> str:
    """README.md of the merged model: the training run's model card (when the run dir has one) + the export."""
    run_card = adapter.parent / "MODEL_CARD.md"
    head = run_card.read_text(encoding="utf-8") if run_card.is_file() else (
        f"# Merged LoRA model\n\nBase `{summary['base']}` with the adapter `{adapter}` merged in.\n")
    check = summary["check"]
    lines = ["", "## This checkpoint (medlora export)", "",
             f"- Merged from adapter `{adapter}` into base `{summary['base']}`; {summary['merge']}.",
             f"- Layout: the base checkpoint's tensor names, shapes and dtypes ({summary['tensors']} tensors, "
             f"{summary['bytes'] / 2**30:.2f} GiB, {len(summary['shards'])} safetensors file(s)).",
             ("- Check: reloaded with `from_pretrained`: "
              f"{'every tensor bit-identical to the merged model' if check['reload_identical'] else 'tensors differ'}; "
              f"logits vs base + adapter on {check['positions']} positions: relative L2 {check['rel_l2']:.2e}, "
              f"top-1 agreement {check['top1_agreement']:.4f} (pass: {check['tolerance']}).") if check
             else "- Check: skipped.",
             f"- Prompt format: see `medlora_export.json` (`format`): style `{summary['format']['style']}`, stop token "
             f"`{summary['format']['stop']['token']}`.", ""]
    return head.rstrip() + "\n" + "\n".join(lines)
