"""Evaluation stage: MedMCQA accuracy by log-likelihood of the answer letter after the prompt.

With the `plain` style this is lm-evaluation-harness' `medmcqa` task (0-shot, `acc`): the four
continuations " A" .. " D" are scored by summed log-probability after `doc_to_text`, and the
argmax is the prediction. The same `medlora.formatting` functions build the training examples.
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

import torch

from medlora.errors import MedloraError, bounded, shown
from medlora.formatting import LETTERS, FormatOptions, build_prompt, encode_choices, stop_token_ids


def _backbone_and_head(model):
    """(backbone, LM head) of a (PEFT-wrapped) causal LM, so scoring projects only the positions it reads; None
    for a sharded (FSDP2) model, whose root forward must run to gather the head's weights."""
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone, head = getattr(base, "base_model", None), base.get_output_embeddings()
    if backbone is None or backbone is base or head is None:
        return None
    return backbone, head


@torch.no_grad()
def score_rows(
    model, tokenizer, rows: list[dict[str, Any]], options: FormatOptions, batch_size: int = 8,
    equal_forwards: bool = False,
) -> list[dict[str, Any]]:
    """Per row: gold, pred and the log-probability of each letter's continuation.

    `equal_forwards`: every rank runs as many forward passes as the busiest one (the extra ones on one
    token, results unused) — under FSDP2 each forward all-gathers the sharded weights, a collective.
    """
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    encoded = [encode_choices(tokenizer, row, options) for row in rows]
    # One sequence per (row, letter) unless every letter is one token: then one forward per row suffices.
    requests = []  # (row index, letter indices, token ids, continuation lengths)
    for i, (context, conts) in enumerate(encoded):
        if all(len(c) == 1 for c in conts):
            requests.append((i, list(range(4)), context, [conts]))
        else:
            for j, cont in enumerate(conts):
                requests.append((i, [j], context + cont, [[cont]]))
    scores = [[0.0] * 4 for _ in rows]
    order = sorted(range(len(requests)), key=lambda k: -len(requests[k][2]))  # similar lengths together
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    split = None if equal_forwards else _backbone_and_head(model)
    for start in range(0, len(order), batch_size):
        batch = [requests[k] for k in order[start : start + batch_size]]
        width = max(len(r[2]) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, (_, _, seq, _) in enumerate(batch):
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
        # the positions whose next-token distribution is read: the last context token (all four one-token
        # letters), or each position before a continuation token
        reads = [[len(seq) - 1] if len(letters) == 4 else list(range(len(seq) - len(conts[0][0]) - 1, len(seq) - 1))
                 for _, letters, seq, conts in batch]
        rows_at = torch.tensor([b for b, r in enumerate(reads) for _ in r], device=device)
        cols_at = torch.tensor([c for r in reads for c in r], device=device)
        if split is not None:  # the LM head on the read positions only: no [batch, length, vocab] logits
            backbone, head = split
            hidden = backbone(input_ids=ids.to(device), attention_mask=mask.to(device))[0]
            logprobs = torch.log_softmax(head(hidden[rows_at, cols_at]).float(), dim=-1)
        else:
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logprobs = torch.log_softmax(logits[rows_at, cols_at].float(), dim=-1)
        offset = 0
        for (row_idx, letters, seq, conts), read in zip(batch, reads):
            if len(letters) == 4:
                for j in letters:
                    scores[row_idx][j] = logprobs[offset, conts[0][j][0]].item()
            else:
                targets = torch.tensor(conts[0][0], device=logprobs.device)
                picked = logprobs[offset: offset + len(read)].gather(-1, targets[:, None])
                scores[row_idx][letters[0]] = picked.sum().item()
            offset += len(read)
    if equal_forwards:
        import torch.distributed as dist

        mine = -(-len(order) // batch_size)
        busiest = torch.tensor([mine], device=device)
        dist.all_reduce(busiest, op=dist.ReduceOp.MAX)
        for _ in range(int(busiest.item()) - mine):
            model(input_ids=torch.full((1, 1), pad, dtype=torch.long, device=device))
    if was_training:
        model.train()
    results = []
    for row, letter_scores in zip(rows, scores):
        pred = max(range(4), key=lambda j: letter_scores[j])
        results.append({
            "id": row["id"],
            "subject": row.get("subject_name") or "Unknown",
            "gold": LETTERS[row["cop"]],
            "pred": LETTERS[pred],
            "correct": pred == row["cop"],
            "logprobs": dict(zip(LETTERS, (round(s, 5) for s in letter_scores))),
            **({"ambiguous": True} if row.get("ambiguous") else {}),
        })
    return results


def bootstrap_ci(correct: list[bool], samples: int = 1000, seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile 95 % interval of the mean accuracy."""
    if not correct or samples <= 0:
        return (None, None)
    rng = random.Random(seed)
    n = len(correct)
    means = sorted(sum(correct[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    return (means[int(0.025 * (samples - 1))], means[int(0.975 * (samples - 1))])


def summarise(predictions: list[dict[str, Any]], bootstrap_samples: int = 1000) -> dict[str, Any]:
    correct = [p["correct"] for p in predictions]
    n = len(correct)
    by_subject: dict[str, list[bool]] = defaultdict(list)
    for p in predictions:
        by_subject[p["subject"]].append(p["correct"])
    gold = Counter(p["gold"] for p in predictions)
    majority_letter, majority_count = gold.most_common(1)[0] if gold else ("A", 0)
    low, high = bootstrap_ci(correct, bootstrap_samples)
    return {
        "accuracy": sum(correct) / n if n else float("nan"),
        "n": n,
        "ci95": [low, high],
        "majority_letter": majority_letter,
        "majority_baseline": majority_count / n if n else float("nan"),
        "chance": 0.25,
        "gold_letters": {x: gold.get(x, 0) for x in LETTERS},
        "pred_letters": {x: sum(p["pred"] == x for p in predictions) for x in LETTERS},
        "ambiguous": sum(bool(p.get("ambiguous")) for p in predictions),
        "per_subject": {
            s: {"n": len(v), "accuracy": sum(v) / len(v)} for s, v in sorted(by_subject.items())
        },
    }


def shard(rows: list, rank: int, world_size: int) -> list:
    return rows[rank::world_size]


def distributed_score(model, tokenizer, rows, options, batch_size=8) -> list[dict[str, Any]]:
    """Each rank scores its shard; every rank gets all predictions back, in the original order."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return score_rows(model, tokenizer, rows, options, batch_size)
    rank, world = dist.get_rank(), dist.get_world_size()
    sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())  # FSDP2
    mine = score_rows(model, tokenizer, shard(rows, rank, world), options, batch_size, equal_forwards=sharded)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    merged: list[Any] = [None] * len(rows)
    for r, part in enumerate(gathered):
        merged[r::world] = part
    return merged


# ---------------------------------------------------------------- loading a model to evaluate


def _model_identity(path: str) -> dict[str, Any] | None:
    """What identifies a local model dir: medlora's build stamp, else its config (names left out); None for hub ids."""
    local = Path(path).expanduser()
    if not local.is_dir():
        return None
    for name in ("medlora_model.json", "config.json"):
        try:
            data = json.loads((local / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if name == "config.json":
            data = {k: v for k, v in data.items() if k not in ("_name_or_path", "transformers_version", "dtype",
                                                                "torch_dtype", "use_cache")}
        return {name: data}
    return None


def check_adapter_base(adapter: str, adapter_config: dict[str, Any], model_path: str) -> None:
    """Refuse an adapter whose base_model_name_or_path names a different model than the one being loaded.

    Same string, or two local dirs holding the same model (medlora stamp / config): fine. Two different hub
    ids, or two local models that differ: refused. A hub id against a local dir cannot be compared offline:
    a warning, and the shapes are still checked when the adapter is loaded.
    """
    base = adapter_config.get("base_model_name_or_path")
    if not base or str(base).rstrip("/") == model_path.rstrip("/"):
        return
    ours, theirs = _model_identity(model_path), _model_identity(str(base))
    if ours is not None and theirs is not None:
        if Path(base).expanduser().resolve() == Path(model_path).expanduser().resolve() or ours == theirs:
            return
        (name, a), (other, b) = next(iter(ours.items())), next(iter(theirs.items()))
        keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        what = (f"a different model ({name} differs in {', '.join(keys[:8])})" if name == other
                else "a different model (only one of them is a medlora build)")
    elif ours is None and theirs is None:
        what = "a different hub model"
    else:
        print(f"medlora: warning: --adapter {adapter} was trained on {base!r}, you load {model_path!r}; "
              "they cannot be compared here (the adapter's shapes are still checked)", file=sys.stderr)
        return
    raise MedloraError(
        f"--adapter {adapter} was trained on {base!r}, but --model_name_or_path is {model_path!r}: {what}. "
        f"Pass --model_name_or_path {base}, or, if it is the same model under another name, set "
        f"base_model_name_or_path in {Path(adapter) / 'adapter_config.json'}"
    )


ADAPTER_FIELD_TYPES = {  # the fields PEFT reads to rebuild a LoRA adapter, with the JSON types it needs
    "r": (int,), "lora_alpha": (int, float), "lora_dropout": (int, float), "bias": (str,),
    "base_model_name_or_path": (str, type(None)), "target_modules": (list, str, type(None)),
    "target_parameters": (list, type(None)), "fan_in_fan_out": (bool,), "use_rslora": (bool,), "use_dora": (bool,),
    "modules_to_save": (list, type(None)), "rank_pattern": (dict,), "alpha_pattern": (dict,),
    "layers_to_transform": (int, list, type(None)), "inference_mode": (bool,), "task_type": (str, type(None)),
}


def read_adapter(adapter: str) -> dict[str, Any]:
    """adapter_config.json of a LoRA adapter dir, checked before anything loads it (one line per problem): JSON
    object, peft_type LORA, the field types PEFT needs, and adapter_model.safetensors present and whole. A
    pickle adapter_model.bin is refused (unpickling can run code; medlora reads safetensors only)."""
    from medlora.data import display_path

    folder = Path(adapter)
    where = f"--adapter {display_path(adapter)}"
    if not folder.is_dir():
        raise MedloraError(f"{where}: {'not a directory' if folder.exists() else 'no such directory'} "
                           "(expected a PEFT adapter dir: adapter_config.json + adapter_model.safetensors)")
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise MedloraError(f"{where}: no adapter_config.json there (expected a PEFT adapter dir)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MedloraError(f"{config_path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    except (ValueError, RecursionError) as err:  # not UTF-8, nesting, a huge integer
        raise MedloraError(f"{config_path}: not a readable JSON file ({type(err).__name__})") from None
    if not isinstance(config, dict):
        raise MedloraError(f"{config_path}: not a PEFT adapter config (a JSON object), got {type(config).__name__}")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise MedloraError(f"{config_path}: " + ("no peft_type: not a PEFT adapter config" if peft_type is None else
                           f"peft_type {shown(peft_type)}: medlora loads LoRA adapters (peft_type LORA) only"))
    for name, types in ADAPTER_FIELD_TYPES.items():
        if name in config and (not isinstance(config[name], types) or
                               isinstance(config[name], bool) and bool not in types):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise MedloraError(f"{config_path}: field '{name}' must be {wanted}, got {shown(config[name])}")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise MedloraError(f"{config_path}: field 'r' (the LoRA rank) must be a whole number >= 1, "
                           f"got {shown(config.get('r'))}")
    if isinstance(config.get("lora_alpha"), (int, float)) and not 0 < config["lora_alpha"] < float("inf"):
        raise MedloraError(f"{config_path}: field 'lora_alpha' must be > 0, got {shown(config['lora_alpha'])}")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        if (folder / "adapter_model.bin").exists():
            raise MedloraError(f"{where}: holds adapter_model.bin (a pickle, which can run code when loaded); medlora "
                               "loads adapter_model.safetensors only: convert it where you trust the file")
        raise MedloraError(f"{where}: no adapter_model.safetensors beside adapter_config.json (no weights)")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as fh:
            count = len(list(fh.keys()))
    except (SafetensorError, OSError) as err:
        raise MedloraError(f"{weights}: not a whole safetensors file ({bounded(err, 200)}): truncated or "
                           "damaged; copy it again") from None
    if not count:
        raise MedloraError(f"{weights}: holds no tensors")
    return config


def load_for_eval(model_args, adapter: str | None):
    """Base model, with the adapter applied when given; checks the adapter was made for this base."""
    import torch

    from medlora.model import load_model, resolve_model_path

    adapter_config: dict[str, Any] = {}
    if adapter is not None:  # checked before the (possibly 60 GB) base model is loaded
        adapter_config = read_adapter(adapter)
        check_adapter_base(adapter, adapter_config, resolve_model_path(model_args))
    device = torch.device("cuda", 0) if torch.cuda.is_available() else None
    model, tokenizer = load_model(model_args, device=device)
    if adapter is None:
        return _route_nf4(model), tokenizer
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        base = adapter_config.get("base_model_name_or_path")
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else type(err).__name__)
        raise MedloraError(
            f"--adapter {adapter} does not fit {resolve_model_path(model_args)!r} "
            f"(it was trained on {base!r}): {detail}"
        ) from None
    return _route_nf4(model), tokenizer


def _route_nf4(model):
    """--load_in_4bit: the NF4 experts (and the adapter's LoRA on them) compute through the grouped GEMM; a model
    without NF4 experts is left as it is (`route_quantized_experts` routes only quantised ones)."""
    from medlora.fast import route_quantized_experts

    route_quantized_experts(model)
    return model


def eval_format(data_args, adapter: str | None, tokenizer, model):
    """(FormatOptions, record): the adapter's recorded training format (adapter/medlora_format.json) when there is
    one, so prompts, BOS and the stop token are exactly those it was trained with; else from the flags."""
    from medlora.audit import zero_weight_rows
    from medlora.formatting import options_from_record
    from medlora.data import resolve_format
    from medlora.formatting import FORMAT_FILE

    record_path = Path(adapter) / FORMAT_FILE if adapter else None
    if record_path is not None and record_path.is_file():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            options = options_from_record(record)
        except (ValueError, KeyError, TypeError) as err:
            raise MedloraError(f"{record_path}: not a medlora format record ({type(err).__name__}: {err})") from None
        if data_args.style != options.style:
            print(f"medlora: note: {adapter} was trained with style {options.style!r}; scoring with its recorded "
                  f"format ({record_path.name}), not --style {data_args.style}", file=sys.stderr)
        return options, record
    return resolve_format(data_args, tokenizer, lambda ids: zero_weight_rows(model, ids))


@torch.no_grad()
def answer(model, tokenizer, row: dict[str, Any], options: FormatOptions, max_new_tokens: int = 64) -> dict[str, Any]:
    """`medlora ask`: letter scores and a greedy completion from the exact training prompt."""
    scored = score_rows(model, tokenizer, [row | {"cop": 0, "id": "ask"}], options)[0]
    context_ids, _ = encode_choices(tokenizer, row | {"cop": 0}, options)
    device = next(p.device for p in model.parameters())
    ids = torch.tensor([context_ids], device=device)
    model.eval()
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=stop_token_ids(tokenizer, options), pad_token_id=tokenizer.pad_token_id, use_cache=True,
    )
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    probs = torch.softmax(torch.tensor(list(scored["logprobs"].values())), dim=0).tolist()
    return {
        "prompt": build_prompt(row, options, tokenizer),
        "letter": scored["pred"],
        "letter_probabilities": dict(zip(LETTERS, (round(p, 4) for p in probs))),
        "generated": text,
    }
