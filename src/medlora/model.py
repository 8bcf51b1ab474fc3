"""Model stage: load Nemotron-H (hub id, local dir or the offline tiny build) and wrap it with LoRA.

The tiny model is a real `NemotronHForCausalLM` with all three layer kinds (Mamba2 `M`, MoE `E`,
attention `*`) at toy width, random weights, and a byte-level BPE tokenizer trained on the spot.
It is written with `save_pretrained` and read back with `from_pretrained`, so the offline default
runs the same loading code as the 30B model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from medlora.config import TINY_MODEL, LoraArguments, ModelArguments
from medlora.errors import ConfigError, MedloraError

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# ChatML with Nemotron-3-Nano's think-tag behaviour (written for medlora, simplified): reasoning is on unless
# enable_thinking=False; the generation prompt then opens (<think>\n) or closes (<think></think>) a think block,
# an assistant turn without think tags gets <think></think> prepended, and an empty system turn is added when
# the conversation has none. The trap: a naive render puts <think></think> inside the trained answer.
CHAT_TEMPLATE = (
    "{%- set enable_thinking = enable_thinking if enable_thinking is defined else true -%}"
    "{%- if messages[0]['role'] != 'system' -%}{{- '<|im_start|>system\\n<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- set content = message['content'] if '<think>' in message['content'] else '<think></think>' + "
    "message['content'] -%}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' if enable_thinking else "
    "'<|im_start|>assistant\\n<think></think>' -}}{%- endif -%}"
)
TINY_CONFIG = dict(
    vocab_size=2048,
    hidden_size=64,
    layers_block_type=["mamba", "moe", "mamba", "attention", "moe", "mamba"],  # M E M * E M
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    mamba_num_heads=4,
    mamba_head_dim=16,
    ssm_state_size=16,
    n_groups=2,
    chunk_size=32,
    conv_kernel=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=64,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
_LAYER_NAMES = {"mamba": "linear_attention", "attention": "full_attention", "moe": "moe", "mlp": "mlp"}


def tiny_config_dict(**overrides: Any) -> dict[str, Any]:
    cfg = {**TINY_CONFIG, **overrides}
    cfg["layers_block_type"] = [_LAYER_NAMES.get(t, t) for t in cfg["layers_block_type"]]
    return cfg


def _tokenizer_corpus() -> list[str]:
    """Text for the tiny tokenizer: the committed sample questions plus prompt scaffolding."""
    from medlora.formatting import LETTERS

    texts = []
    sample = Path(__file__).resolve().parents[2] / "data" / "sample" / "medmcqa_sample.jsonl"
    if sample.exists():
        for line in sample.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts.append(" ".join(str(row.get(k) or "") for k in ("question", "opa", "opb", "opc", "opd", "exp")))
    scaffold = "Question: Choices:\n" + "".join(f"{x}. \n" for x in LETTERS) + "Answer:"
    texts += [scaffold] * 50 + [f"Answer: {x}. Explanation:" for x in LETTERS] * 50
    return texts


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_CONFIG["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def _spec_hash(config: dict[str, Any], seed: int) -> str:
    blob = json.dumps({"config": config, "seed": seed, "corpus": _tokenizer_corpus(), "template": CHAT_TEMPLATE,
                       "layout": "hub"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def write_model_dir(output_dir: str | Path, stamp: dict[str, Any], write) -> Path:
    """Build `output_dir` once: `write(tmp_dir)` fills a temporary directory that then replaces it.

    `stamp` is stored as `medlora_model.json`; a directory holding the same stamp is reused. A file lock
    makes concurrent callers (torchrun ranks, parallel tests) build it once, and readers never see a
    half-written model.
    """
    from filelock import FileLock

    output_dir = Path(output_dir)
    marker = output_dir / "medlora_model.json"
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(output_dir) + ".lock"):
        if marker.exists() and json.loads(marker.read_text()) == stamp:
            return output_dir
        tmp = Path(tempfile.mkdtemp(prefix=output_dir.name + ".tmp-", dir=output_dir.parent))
        try:
            # The builders seed their own RNG; the caller's RNG (set_seed before loading, then LoRA init)
            # must not depend on whether the directory already existed.
            with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
                write(tmp)
            (tmp / marker.name).write_text(json.dumps(stamp))
            if output_dir.exists():
                shutil.rmtree(output_dir)
            os.replace(tmp, output_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def build_tiny_model(output_dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a random tiny Nemotron-H + tokenizer to `output_dir` (atomically; reused if current)."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    config = tiny_config_dict(**overrides)

    def write(tmp: Path) -> None:
        torch.manual_seed(seed)
        model = NemotronHForCausalLM(NemotronHConfig(**config))
        # Not model.save_pretrained: under torchrun it writes only on global rank 0, and whichever rank
        # takes the lock builds (on every node). Written in the hub's layout, as the real checkpoint is: one
        # tensor per routed expert under `backbone.`; from_pretrained fuses them (the same loading path).
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_hub_layout(model, tmp)
        build_tiny_tokenizer().save_pretrained(tmp)

    return write_model_dir(output_dir, {"tiny": _spec_hash(config, seed), "seed": seed}, write)


def hub_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under the hub checkpoint's names and shapes (one tensor per routed expert).

    transformers fuses the hub's per-expert tensors into 3-D ones at load and reverts that on save only for the
    conversions a load used; the default nemotron_h mapping is applied here whatever the model was loaded from.
    """
    from transformers.core_model_loading import revert_weight_conversion

    saved = getattr(model, "_weight_conversions", None)
    if hasattr(model, "_weight_conversions"):
        del model._weight_conversions  # absent: revert_weight_conversion uses the model type's default mapping
    try:
        return revert_weight_conversion(model, model.state_dict())
    finally:
        if saved is not None:
            model._weight_conversions = saved


def save_hub_layout(model, directory: Path, max_shard_bytes: int = 5 * 2**30,
                    dtypes: dict[str, torch.dtype] | None = None) -> dict[str, Any]:
    """Write `hub_state_dict(model)` as sharded safetensors with an index (one file when it fits a shard).

    `dtypes`: name -> dtype to write (the original checkpoint's); default the model's. Shards are written one at
    a time from the model's device, so host memory holds one shard at most.
    """
    from safetensors.torch import save_file

    state = hub_state_dict(model)
    names = sorted(state)
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        dtype = (dtypes or {}).get(name, state[name].dtype)
        nbytes = state[name].numel() * torch.empty((), dtype=dtype).element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for filename, shard in zip(files, shards):
        tensors = {}
        for name in shard:
            tensor = state[name].detach()
            tensor = tensor.to((dtypes or {}).get(name, tensor.dtype)).contiguous().cpu()
            tensors[name] = tensor
            total += tensor.numel() * tensor.element_size()
            weight_map[name] = filename
        save_file(tensors, str(Path(directory) / filename), metadata={"format": "pt"})
        del tensors
    if len(files) > 1:
        (Path(directory) / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return {"files": files, "tensors": len(names), "bytes": total}


def checkpoint_zero_rows(path: str):
    """`zero_rows` for `formatting.choose_stop_token` reading only the embedding and LM-head rows of a local
    checkpoint (no model load); a hub id that is not a local dir returns None (cannot be checked here)."""
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []

    def zero_rows(ids):
        if not files:
            return None
        from safetensors import safe_open

        rows: dict[int, str] = {}
        for file in files:
            with safe_open(str(file), "pt") as fh:
                for key in fh.keys():
                    if key not in ("lm_head.weight", "backbone.embeddings.weight", "model.embeddings.weight",
                                   "model.embed_tokens.weight"):
                        continue
                    what = "LM-head" if key == "lm_head.weight" else "input-embedding"
                    weight = fh.get_slice(key)
                    for i in ids:
                        if not bool(weight[i:i + 1].abs().amax() > 0):
                            rows[i] = what if i not in rows else f"{rows[i]} and {what}"
        return rows

    return zero_rows


# NVIDIA-Nemotron-3-Nano-30B-A3B (config.json of the hub checkpoint): widths used for random-weight specs.
NANO_CONFIG = dict(
    vocab_size=131072, hidden_size=2688, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
    intermediate_size=1856, mamba_num_heads=64, mamba_head_dim=64, ssm_state_size=128, n_groups=8,
    chunk_size=128, conv_kernel=4, expand=2, n_routed_experts=128, num_experts_per_tok=6,
    moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712, n_shared_experts=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, n_group=1, topk_group=1, mlp_hidden_act="relu2",
    max_position_embeddings=262144, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    use_conv_bias=True, mamba_proj_bias=False, use_bias=False, layer_norm_epsilon=1e-5,
)
NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
SPECS = {"nano-quarter": NANO_PATTERN[:13], "nano-full": NANO_PATTERN}


def build_in_memory(spec: str, seed: int, device, nf4_experts: bool = False, dtype=None):
    """(model, tokenizer): the random model of `spec` built straight on `device` in `dtype` (default bf16 on a
    GPU, fp32 on CPU), no disk.

    `nf4_experts` (--load_in_4bit): the model is laid out on the meta device and made one block at a time on
    `device` (weights drawn by transformers' own `_init_weights`, children before parents as in `from_config`),
    each MoE block's experts quantised to NF4 before the next block exists, so the bf16 model never sits in
    memory (nano-full: 63 GB) — the peak is one block's bf16 experts. Same distributions, other random values
    than the bf16 build (tested)."""
    import torch
    from transformers import AutoModelForCausalLM, NemotronHConfig

    if spec == "tiny":
        config = NemotronHConfig(**tiny_config_dict())
    elif spec in SPECS:
        config = NemotronHConfig(**NANO_CONFIG, hybrid_override_pattern=SPECS[spec])
    else:
        raise MedloraError(f"random models: tiny or {sorted(SPECS)}; got {spec!r}")
    torch_device = torch.device(device if device is not None else "cpu")
    dtype = dtype or (torch.bfloat16 if torch_device.type == "cuda" else torch.float32)
    torch.manual_seed(seed)
    if not nf4_experts:
        with torch_device:  # parameters are created in `dtype` on the device: no fp32 copy of 31.6 B weights
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        from medlora.quant import quantize_experts

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        backbone = model.model
        for part in (backbone.embeddings, *backbone.layers, backbone.norm_f, model.lm_head):
            part.to_empty(device=torch_device)
            for module in reversed(list(part.modules())):  # every child before its parent (a block rescales out_proj)
                model._init_weights(module)
            if any(type(m).__name__ == "NemotronHExperts" for m in part.modules()):
                quantize_experts(part)
    model.config.use_cache = False
    return model, build_tiny_tokenizer()


RANDOM_PREFIX = "random:"  # random:nano-full, random:nano-quarter: real widths, random weights, built in memory


def resolve_model_path(args: ModelArguments) -> str:
    if args.model_name_or_path == TINY_MODEL:
        return str(build_tiny_model(args.tiny_cache_dir))
    return args.model_name_or_path


def random_spec(path: str) -> str | None:
    """'nano-full' for 'random:nano-full'; None for anything else. Unknown specs are refused."""
    if not path.startswith(RANDOM_PREFIX):
        return None
    spec = path[len(RANDOM_PREFIX):]
    if spec not in ("tiny", *SPECS):
        raise ConfigError(f"--model_name_or_path {path}: unknown random spec; choose from "
                          f"{', '.join(RANDOM_PREFIX + s for s in ('tiny', *SPECS))}")
    return spec


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
            "float32": torch.float32, "fp32": torch.float32}[name]


def _unreachable(path: str, err: Exception) -> MedloraError:
    from huggingface_hub import is_offline_mode

    reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"
    if path.startswith((".", "/", "~")) or os.sep in path.rstrip(os.sep) and Path(path).parent.is_dir():
        if not Path(path).expanduser().exists():  # meant as a local directory: the hub advice would mislead
            return MedloraError(f"--model_name_or_path {path}: no such directory (expected a model directory with "
                                "config.json, or a hub id such as nvidia/...)")
        return MedloraError(f"cannot load {path!r}: {reason}")
    why = ("HF_HUB_OFFLINE=1 is set, so the Hugging Face Hub is not contacted, and this hub id is not in the local "
           "cache." if is_offline_mode() else "Check the hub id and the network (a gated model needs `hf auth login`).")
    return MedloraError(
        f"cannot load {path!r}: {reason}\n{why} "
        f"To run offline, download it once where there is network (`hf download {path} --local-dir DIR`) and pass "
        "--model_name_or_path DIR (a local directory); or use --model_name_or_path tiny for the offline test model."
    )


def load_tokenizer(args: ModelArguments, path: str | None = None):
    from transformers import AutoTokenizer

    path = path or resolve_model_path(args)
    if random_spec(path):
        tokenizer = build_tiny_tokenizer()  # its ids fit any vocabulary; lengths differ from Nemotron's tokenizer
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        return tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=args.revision)
    except (OSError, ValueError) as err:
        raise _unreachable(path, err) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(args: ModelArguments, device: torch.device | str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer) for a hub id, a local dir or 'tiny'; bf16 on GPU, native transformers code."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(args)
    tokenizer = load_tokenizer(args, path)
    dtype = resolve_dtype(args.torch_dtype)
    spec = random_spec(path)
    if spec:  # the rehearsal's stand-in for the real checkpoint: same widths, random weights, no disk
        devices = [torch.device(device).index or 0] if device is not None and torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the caller's seeded RNG (LoRA init) stays untouched
            # NF4 experts are quantised as each block is made, so that model is made in `dtype` (a cast after
            # quantising would cast the fp32 absmax too); the bf16 build is cast as before (same values)
            model, _ = build_in_memory(spec, 0, device, nf4_experts=args.load_in_4bit,
                                       dtype=dtype if args.load_in_4bit else None)
        if dtype != next(model.parameters()).dtype:
            model = model.to(dtype)
        model.name_or_path = model.config._name_or_path = path  # recorded as the adapter's base model
        if args.experts_implementation:
            model.set_experts_implementation(args.experts_implementation)
        model.config.use_cache = False
        if args.load_in_4bit:
            quantize_for_training(model)
        return model, tokenizer
    kwargs: dict[str, Any] = dict(
        dtype=dtype, attn_implementation=args.attn_implementation, revision=args.revision,
        trust_remote_code=trust_remote_code, use_safetensors=True,
    )
    if args.experts_implementation:
        kwargs["experts_implementation"] = args.experts_implementation
    cuda = device is not None and torch.device(device).type == "cuda"
    if args.load_in_4bit:
        # no peft.prepare_model_for_kbit_training: it casts every parameter that is not 4-bit to fp32 (here the
        # 29.4 B expert values before quantisation, 117 GB); fast checkpoints by itself and LoRA gets gradients
        model = load_4bit(path, args, kwargs, device if cuda else torch.device("cpu"))
    else:
        if cuda:
            kwargs["device_map"] = {"": torch.device(device).index or 0}  # each rank loads straight to its GPU
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as err:
            raise _unreachable(path, err) from None
    model.config.use_cache = False  # training; generation turns it back on per call
    return model, tokenizer


def checkpoint_folder(path: str, revision: str | None) -> Path:
    """The local folder of a model: `path` itself, or the hub snapshot (config, generation config, safetensors)."""
    if Path(path).expanduser().is_dir():
        return Path(path).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, revision=revision, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:  # noqa: BLE001 - offline, gated, unknown id: one message with the way out
        raise _unreachable(path, err) from None


def load_4bit(path: str, args: ModelArguments, kwargs: dict[str, Any], device) -> Any:
    """--load_in_4bit from a checkpoint: the model laid out on the meta device, then filled tensor by tensor with
    the routed experts quantised to NF4 as they are read (`medlora.quant.load_checkpoint_nf4`): the bf16 experts
    (58.8 GB for Nano) never exist in host or GPU memory, one layer's projection at most."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from medlora.quant import load_checkpoint_nf4

    folder = checkpoint_folder(path, args.revision)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=kwargs["trust_remote_code"])
    except (OSError, ValueError) as err:
        raise _unreachable(path, err) from None
    build = {k: kwargs[k] for k in ("dtype", "attn_implementation", "trust_remote_code")}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **build)
    load_checkpoint_nf4(model, folder, device, kwargs["dtype"])
    if "experts_implementation" in kwargs:
        model.set_experts_implementation(kwargs["experts_implementation"])
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.name_or_path = model.config._name_or_path = path  # as from_pretrained records it (the adapter's base)
    model.eval()  # as from_pretrained returns it
    quantize_for_training(model)  # the experts are NF4 already; the linear layers now, on the device
    return model


def quantize_for_training(model) -> None:
    """--load_in_4bit: the routed experts (medlora.quant) and every nn.Linear but the LM head (bitsandbytes
    Linear4bit) to NF4, where the model is; what is stored in which dtype is printed and kept on the model for the
    run's report. Experts already in NF4 (a streamed checkpoint, a block-by-block random build) are left as they
    are."""
    from medlora.quant import quantize_experts, quantize_linears, weights_by_dtype

    done = quantize_experts(model)
    done.update(quantize_linears(model))
    model._medlora_quantization = {**done, "parameters_by_dtype": weights_by_dtype(model)}
    counts = ", ".join(f"{k} {v / 1e9:.2f} B" for k, v in model._medlora_quantization["parameters_by_dtype"].items())
    print(f"--load_in_4bit: NF4 routed experts of {done['nf4_expert_layers']} MoE layers ({done['nf4_params'] / 1e9:.2f} "
          f"B parameters, {done['nf4_gib']} GiB) and {done['nf4_linear_layers']} nn.Linear layers "
          f"({done['nf4_linear_params'] / 1e9:.2f} B, {done['nf4_linear_gib']} GiB); parameters by dtype: {counts}",
          flush=True)


def lora_config(args: LoraArguments):
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=list(args.lora_target_modules),
        target_parameters=list(args.lora_target_parameters) or None,
        use_rslora=args.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_lora_targets(model, args: LoraArguments) -> None:
    """Refuse a LoRA target that matches nothing in `model` (PEFT trains the other targets and says nothing when
    only some names match: `q_prj` would train without q_proj, exit 0). Matching is PEFT's own: a module (or,
    for target_parameters, a parameter) whose dotted name is the target or ends with `.target`."""
    import difflib

    modules = [name for name, _ in model.named_modules()]
    parameters = [name for name, _ in model.named_parameters()]
    for option, targets, names in (("--lora_target_modules", args.lora_target_modules, modules),
                                   ("--lora_target_parameters", args.lora_target_parameters, parameters)):
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if unmatched:
            leaves = sorted({".".join(n.split(".")[-len(t.split(".")):]) for n in names for t in unmatched})
            hints = [f"{t!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(t, leaves, n=1))
                     else repr(t) for t in unmatched]
            raise ConfigError(f"{option}: {', '.join(hints)} match(es) no {'module' if names is modules else 'parameter'}"
                              f" of {type(model).__name__}; nothing would be trained there")


def apply_lora(model, args: LoraArguments):
    from peft import get_peft_model

    check_lora_targets(model, args)
    try:
        return get_peft_model(model, lora_config(args))
    except ValueError as err:
        raise ConfigError(f"LoRA targets {args.lora_target_modules} / {args.lora_target_parameters}: {err}") from None


def lora_table(model) -> list[dict[str, Any]]:
    """One row per kind of LoRA target (layer index folded): count, LoRA params, frozen base params."""
    from peft.tuners.lora import LoraLayer

    rows: dict[str, dict[str, int]] = defaultdict(lambda: {"count": 0, "lora_params": 0, "base_params": 0})
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        parameter_name = getattr(module, "parameter_name", None)  # set on target_parameters wrappers
        path = [p for p in name.split(".") if p != "base_layer"][3:]  # drop base_model.model.model
        kind = ".".join("N" if p.isdigit() else p for p in path) + (f".{parameter_name}" if parameter_name else "")
        base = module.get_base_layer()
        target = getattr(base, parameter_name) if parameter_name else base.weight
        row = rows[kind]
        row["count"] += 1
        row["base_params"] += target.numel()
        row["lora_params"] += sum(p.numel() for d in (module.lora_A, module.lora_B) for p in d.parameters())
    return [{"target": kind, **row} for kind, row in sorted(rows.items())]


def print_lora_table(model, console=None) -> dict[str, int]:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="LoRA-wrapped modules")
    for col in ("target", "count", "LoRA params", "base params"):
        table.add_column(col, justify="right" if col != "target" else "left")
    for row in lora_table(model):
        table.add_row(row["target"], str(row["count"]), f"{row['lora_params']:,}", f"{row['base_params']:,}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    console.print(table)
    console.print(f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f} %)")
    return {"trainable_params": trainable, "total_params": total}
