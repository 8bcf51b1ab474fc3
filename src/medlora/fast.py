"""Backend `fast`: a padding-free Nemotron-H training forward with Triton Mamba2, grouped-LoRA MoE and varlen attention.

The model is the same `NemotronHForCausalLM` + PEFT LoRA that `hf` trains (same parameters, same
adapter files); only the backbone's forward is replaced, on this one instance:

* padding-free: the real tokens of a batch become one stream; sequence starts come from the attention
  mask (each row) and from `position_ids` resetting to 0 (rows packed by TRL). Every mixer respects
  them — attention is block-diagonal, the convolution and the SSM state restart at each sequence. The
  stream ends with up to 15 zero rows, so every Triton kernel sees one row-count case (STREAM_MULTIPLE;
  lever `stream_padding`, which also takes mamba_ssm's chunk and row counts off Triton's specialisation).
* Mamba2: `in_proj` and `out_proj` are called as modules, so their LoRA adapters act; the causal
  convolution runs in fla-core's Triton kernel (`cu_seqlens`), the SSD scan in mamba_ssm's Triton
  `mamba_chunk_scan_combined` (`seq_idx`), both loaded without any CUDA extension.
* MoE: tokens sorted by expert, one grouped GEMM per projection over the frozen experts, and the
  LoRA update as two grouped low-rank GEMMs on the same routed tokens — W + BA is never formed
  (PEFT's `target_parameters` path forms it for all 128 experts on every call).
* attention: `torch.nn.attention.varlen.varlen_attn` (flash) over `cu_seqlens`.
* the LM head is TRL's: it projects only the positions with a label (completion tokens) in chunks.
* norms: the 52 RMSNorms and the 23 gated group RMSNorms of the Mamba mixers run as mamba_ssm's Triton
  kernels, one pass forward and one backward each (eager they are ~10 elementwise passes over fp32 copies).
* `compile` (opt-in): the router — and the norms when `triton_norms` is off — run as
  `torch.compile(dynamic=True)` graphs of pure functions equal to transformers' modules.
* activation checkpointing per block, optionally for some block kinds only (selective); `offload_checkpoints`
  (opt-in) keeps each checkpointed block's input in pinned host memory until its recompute.
* `compile_blocks` (opt-in): each block as `torch.compile(dynamic=True)` graphs, the Triton kernels outside them.

Each kernel has an exact PyTorch reference (used on CPU, where the Triton kernels cannot run, and
in the equivalence tests). `levers` switches kernels off one at a time for the bench.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.machinery
import importlib.util
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

LEVERS = ("triton_mamba", "triton_norms", "grouped_lora_moe", "fused_moe", "varlen_attention", "stream_padding",
          "compile", "compile_blocks", "offload_checkpoints")  # each can be switched off
DEFAULT_LEVERS = ("triton_mamba", "triton_norms", "grouped_lora_moe", "fused_moe",
                  "varlen_attention", "stream_padding")  # the other three: opt-in (README)
# stream_padding: the stream padded to STREAM_MULTIPLE rows and mamba_ssm's UNSPECIALIZED_ARGS off Triton's
# specialisation, so no kernel variant is built mid-run; a lever so that its cost can be measured (fast[-...])
CHECKPOINT_BLOCKS = ("mamba", "attention", "moe", "mlp")  # Nemotron-H block kinds (selective checkpointing)
from medlora.errors import MedloraError
from medlora.quant import nf4_weights


# ---------------------------------------------------------------- sequence layout


@dataclass
class Stream:
    """Where each sequence of a padding-free token stream starts and ends.

    Built with the forward's only host syncs (which tokens are real, where sequences start, the longest one): every
    per-layer index a kernel needs is derived from these once, so no layer waits for the GPU to drain.
    """

    keep: torch.Tensor | None  # flat indices of the real tokens in the (B*L) batch; None when nothing was padded
    seq_id: torch.Tensor  # [T] sequence number of each token
    pos: torch.Tensor  # [T] position inside its sequence
    cu_seqlens: torch.Tensor  # [N+1] int32
    max_len: int
    shape: tuple[int, int]  # (B, L) of the batch the stream came from
    cu_seqlens_host: torch.Tensor | None = None  # [N+1] int64 on the CPU
    pad: int = 0  # zero rows after the real tokens, one sequence of their own (STREAM_MULTIPLE)
    _derived: dict = field(default_factory=dict, repr=False)

    def derived(self, name: str, make):
        """`make()` once per stream (forward and checkpoint recompute share the stream, so every layer does)."""
        if name not in self._derived:
            self._derived[name] = make()
        return self._derived[name]

    @property
    def tokens(self) -> int:  # real tokens; the stream has `tokens + pad` rows
        return self.seq_id.numel() - self.pad

    @property
    def seq_idx(self) -> torch.Tensor:  # mamba_ssm's SSD layout: [1, T] int32
        return self.derived("seq_idx", lambda: self.seq_id.to(torch.int32).unsqueeze(0))

    @property
    def cu_seqlens_long(self) -> torch.Tensor:
        return self.derived("cu_seqlens_long", lambda: self.cu_seqlens.long())

    def conv_chunk_indices(self, chunk_size: int = 64) -> torch.Tensor:
        """fla-core's (sequence, chunk) table for its varlen conv, built from the host copy of `cu_seqlens`: left
        to fla, each conv call would rebuild it with a device-to-host sync (a new `cu_seqlens` tensor each call
        misses fla's identity cache), three times per Mamba layer per step."""
        from fla.ops.utils import prepare_chunk_indices

        return self.derived(f"conv_chunks_{chunk_size}", lambda: prepare_chunk_indices(
            self.cu_seqlens_long, chunk_size, cu_seqlens_cpu=self.cu_seqlens_host))

    def derive_for(self, kernels: Kernels) -> None:
        """Build every derived tensor the kernels read now, before the first block. Built lazily inside a block,
        lever compile_blocks' graphs traced the build: dynamo guarded on which entries existed yet and on
        fla-core's tensor cache (a deque of its last 4 calls, whose length it guards), so two frames recompiled
        on each of the first four batches, 1.2 s of compiles and 0.4 s of GC in each of the first two timed steps
        (nano-full, H200, 2026-12-03)."""
        if kernels.ssd is not None:
            _ = self.seq_idx  # a property: built on its first read
        if kernels.conv is not None:
            self.conv_chunk_indices()  # and cu_seqlens_long, which it reads


# Triton specialises every integer argument on divisibility by 16 and compiles a new variant of the kernel the
# first time it sees the other case. Token and routed-row counts change with every batch (a 2.1x step on
# nano-full was medlora's relu² kernel meeting 6T ≡ 0 mod 16 for the first time; mamba_ssm's and fla's kernels
# take T itself). A stream padded to a multiple of 16 tokens makes every count derived from it one case for good.
STREAM_MULTIPLE = 16


def make_stream(batch_shape: tuple[int, int], device, attention_mask=None, position_ids=None,
                multiple: int = 1) -> Stream:
    """The stream's layout; with `multiple` > 1, (-T mod multiple) pad rows follow as a sequence of their own,
    so they reach no real token (block-diagonal attention, conv and SSM state restart) and get no gradient."""
    b, length = batch_shape
    keep = None
    row = torch.arange(b, device=device).repeat_interleave(length)
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        keep = attention_mask.reshape(-1).nonzero().squeeze(1)
        row = row[keep]
    pad = -row.numel() % multiple
    if pad:
        row = torch.cat([row, row.new_full((pad,), b)])  # row number b: after every real row
    start = torch.ones_like(row, dtype=torch.bool)
    start[1:] = row[1:] != row[:-1]
    if position_ids is not None and attention_mask is None:  # TRL padding-free / packed rows: 0 starts a sequence
        flat = position_ids.reshape(-1)
        start[:flat.numel()] |= (flat if keep is None else flat[keep]) == 0
    seq_id = torch.cumsum(start.int(), 0) - 1
    cu = F.pad(start.nonzero().squeeze(1), (0, 1), value=row.numel())  # sequence starts, then the end
    cu_host = cu.cpu()
    max_len = int((cu_host[1:] - cu_host[:-1]).max())
    pos = torch.arange(seq_id.numel(), device=device) - cu[seq_id]
    return Stream(keep, seq_id, pos, cu.to(torch.int32), max_len, (b, length), cu_host, pad)


# ---------------------------------------------------------------- kernels: loading


@functools.cache
def _load_mamba_ssm(unspecialized: bool) -> dict[str, Any]:
    """mamba_ssm's Triton SSD and norms from medlora's kernel cache (`medlora.kernels`), never as a package;
    `unspecialized`: with UNSPECIALIZED_ARGS off Triton's specialisation (`unspecialize`). No default: the cache
    keys on the arguments as written, so `f()` and `f(True)` would import the modules twice.

    Its `__init__` files import the CUDA extension, so empty stand-in packages point Python at the cached
    folders for the import, and every `mamba_ssm` module is forgotten right after: transformers in this process
    must never conclude that mamba_ssm is installed and switch `hf` to its CUDA-only fused path.
    """
    from medlora.kernels import ensure_mamba_ssm

    pkg = ensure_mamba_ssm() / "mamba_ssm"  # downloads and hash-checks the pinned sdist on first use
    stubs = {}
    for name, sub in (("mamba_ssm", ""), ("mamba_ssm.ops", "ops"), ("mamba_ssm.ops.triton", "ops/triton"),
                      ("mamba_ssm.utils", "utils")):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(pkg / sub) if sub else str(pkg)]
            module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            sys.modules[name] = stubs[name] = module
    try:
        loaded = {"ssd": importlib.import_module("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined,
                  "rms_norm": importlib.import_module("mamba_ssm.ops.triton.layer_norm").rms_norm_fn,
                  "gated_rms_norm": importlib.import_module("mamba_ssm.ops.triton.layernorm_gated").rmsnorm_fn}
        ops = [module for name, module in sys.modules.items() if name.startswith("mamba_ssm.ops.")]
        loaded["unspecialized"] = unspecialize(ops) if unspecialized else []
        return loaded
    finally:
        for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
            del sys.modules[name]


# Counts that change with the batch and that the padded stream (STREAM_MULTIPLE) cannot hold to one divisibility
# case: the SSD's chunk count ceil(T / chunk_size) (state passing and two backward kernels), and the norms'
# backward rows per program ceil(T / SMs) (the 2026-12-01 b176 run compiled `_layer_norm_bwd_kernel` twice in
# its first round for it, 0.2 s each). Each is a multiple of 16 for one batch in 16.
UNSPECIALIZED_ARGS = ("nchunks", "rows_per_program")


def unspecialize(modules, names=UNSPECIALIZED_ARGS) -> list[str]:
    """Take `names` off Triton's integer specialisation (as `do_not_specialize` does) in every kernel of `modules`
    that has not been launched yet (its argument binder is built at the first launch).

    Returns the "module.kernel.argument" names it changed."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return []
    done = set()
    for module in modules:
        for attr, kernel in vars(module).items():
            fn = kernel
            for _ in range(16):  # autotune and each heuristics wrap the JITFunction, as `.fn`
                if isinstance(fn, JITFunction) or getattr(fn, "fn", None) is None:
                    break
                fn = fn.fn
            if not isinstance(fn, JITFunction) or getattr(fn, "device_caches", True):  # launched: binder built
                continue
            for param in fn.params:
                if param.name in names and not param.is_constexpr:
                    param.do_not_specialize = True
                    done.add(f"{fn.module.rsplit('.', 1)[-1]}.{fn.fn.__name__}.{param.name}")
    return sorted(done)


def triton_norms(loaded: dict[str, Any]):
    """(rms_norm, gated_rms_norm) with the signatures of the pure functions below, as mamba_ssm's Triton kernels:
    fp32 statistics, one rounding to the input dtype (eager rounds the normalised value, then multiplies by the
    weight in that dtype: the two differ by at most one bf16 ulp of the output)."""
    plain, gated = loaded["rms_norm"], loaded["gated_rms_norm"]

    def rms_norm_triton(x, weight, eps):
        return plain(x, weight, None, eps=eps)

    def gated_rms_norm_triton(x, gate, weight, eps, group_size):
        # norm(x * silu(gate)) per group of `group_size` channels: Zamba2RMSNormGated / MambaRMSNormGated
        return gated(x, weight, None, z=gate, eps=eps, group_size=group_size, norm_before_gate=False)

    return rms_norm_triton, gated_rms_norm_triton


@functools.cache
def _load_fla_conv():
    from fla.modules.causal_conv1d import causal_conv1d

    return causal_conv1d


@dataclass
class Kernels:
    ssd: Any = None  # mamba_chunk_scan_combined or None (PyTorch reference)
    conv: Any = None  # fla causal_conv1d or None
    varlen_attention: Any = None  # torch varlen_attn or None (SDPA with a block-diagonal mask)
    grouped_lora_moe: bool = True
    grouped_gemm: str = "grouped_mm"  # "grouped_mm" (torch / transformers), "grouped_mm_eager" (the same, outside
    # compile_blocks' graphs) or "loop" (per expert; sm80, fp32)
    moe: Any = None  # medlora.fused.MoeKernels (lever fused_moe), or None: the model's act_fn, eager permutes
    rms_norm: Any = None  # the pure functions below (eager, or compiled with `compile`) or the Triton norms
    gated_rms_norm: Any = None
    route: Any = None
    plan: dict = field(default_factory=dict)  # medlora.kernels.plan_fast: part -> Choice
    unspecialized: tuple = ()  # mamba_ssm module.kernel.argument off Triton's specialisation (UNSPECIALIZED_ARGS)
    stream_multiple: int = 1  # the stream's row count is a multiple of this (lever stream_padding: STREAM_MULTIPLE)
    block_compute: Any = None  # `block_compute`, or its torch.compile graph (lever compile_blocks)
    offload: Any = None  # HostOffload (lever offload_checkpoints) or None

    def __post_init__(self):
        self.rms_norm = self.rms_norm or rms_norm
        self.gated_rms_norm = self.gated_rms_norm or gated_rms_norm
        self.route = self.route or route
        self.block_compute = self.block_compute or block_compute

    def describe(self) -> dict[str, str]:
        from medlora.kernels import describe_plan

        return describe_plan(self.plan)


def load_kernels(levers: tuple[str, ...] = DEFAULT_LEVERS, device=None, arch: str = "auto",
                 dtype: torch.dtype = torch.bfloat16) -> tuple[Kernels, list[str]]:
    """The kernels `medlora.kernels.plan_fast` picks for this device and the levers, and a note per fallback.

    On a GPU a requested Triton kernel that cannot be loaded is an error naming the fix (running the PyTorch
    reference instead would be tens of times slower without saying so); on a CPU the references run.
    """
    from medlora.kernels import KernelSetupError, gpu_facts, plan_fast

    unknown = set(levers) - set(LEVERS)
    if unknown:
        raise MedloraError(f"fast levers: unknown {sorted(unknown)}; choose from {LEVERS}")
    cuda = device is not None and torch.device(device).type == "cuda"
    facts = gpu_facts(device) if cuda else {"cuda": False}
    capability = tuple(facts["capability"]) if cuda else None
    unavailable: dict[str, str] = {}
    kernels = Kernels(grouped_lora_moe="grouped_lora_moe" in levers,
                      stream_multiple=STREAM_MULTIPLE if "stream_padding" in levers else 1)
    loaded: dict[str, Any] = {}
    if cuda and ("triton_mamba" in levers or "triton_norms" in levers):
        try:
            loaded = _load_mamba_ssm("stream_padding" in levers)
        except KernelSetupError as err:
            raise MedloraError(str(err)) from None
        except ImportError as err:  # mamba_ssm's Triton files import einops and triton
            raise MedloraError(f"backend fast: mamba_ssm's Triton SSD needs {err.name or err}: run "
                               "`uv sync --extra fast`") from None
        except Exception as err:  # noqa: BLE001 - a broken import: say which and how to get out of it
            raise MedloraError(f"backend fast: mamba_ssm's Triton SSD does not import ({type(err).__name__}: {err}); "
                               "pass --fast_levers without triton_mamba and triton_norms to run the PyTorch "
                               "references") from None
    kernels.unspecialized = tuple(loaded.get("unspecialized", ()))
    if cuda and "triton_mamba" in levers:
        kernels.ssd = loaded["ssd"]
        try:
            kernels.conv = _load_fla_conv()
        except ImportError as err:
            raise MedloraError(f"backend fast: fla-core's causal_conv1d is not installed ({err}); run "
                               "`uv sync --extra fast`") from None
    if cuda and "varlen_attention" in levers:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError as err:
            unavailable["attention"] = f"torch varlen_attn unavailable ({err})"
            varlen_attn = None
    name = str(dtype).replace("torch.", "")
    kernels.plan = plan_fast(tuple(levers), cuda, capability, name, arch, unavailable)
    if kernels.plan["attention"].kernel.startswith("torch varlen_attn"):
        kernels.varlen_attention = varlen_attn
    kernels.grouped_gemm = _gemm_kind(kernels.plan)
    if "fused_moe" in levers:
        from medlora import fused

        kernels.moe = fused.MoeKernels.for_device(kernels.plan["moe_activation"].kernel.startswith("medlora Triton"))
    if kernels.plan["norms"].kernel.startswith("mamba_ssm"):
        kernels.rms_norm, kernels.gated_rms_norm = triton_norms(loaded)
    elif kernels.plan["norms"].kernel.startswith("torch.compile"):
        kernels.rms_norm, kernels.gated_rms_norm = (torch.compile(fn, dynamic=True) for fn in (rms_norm, gated_rms_norm))
    if kernels.plan["router"].kernel.startswith("torch.compile"):
        kernels.route = torch.compile(route, dynamic=True)
    if "compile_blocks" in levers:
        compile_blocks(kernels)
    if "offload_checkpoints" in levers:
        kernels.offload = HostOffload(device if device is not None else "cpu")
    notes = [f"fast: {c.part}: {c.kernel} ({c.reason})" for c in kernels.plan.values() if c.fallback]
    return kernels, notes


COMPILE_BACKEND = "inductor"  # lever compile_blocks; the CPU test traces with "aot_eager" (no C++ build)
COMPILE_RECOMPILE_LIMIT = 64  # graphs per function: a few per block kind (dynamo's default, 8, would fall back)


def compile_blocks(kernels: Kernels) -> None:
    """Lever `compile_blocks`: `block_compute` as `torch.compile(dynamic=True)` graphs — one per block kind, the
    token count symbolic, so a new batch length compiles nothing — fusing what runs between the kernels (LoRA
    scale-and-add, residual, casts, the MoE's routing and permutation arithmetic) forward and backward. The Triton
    kernels (SSD, conv, norms, relu², gather-sum) and flash attention stay out of the graph (graph breaks):
    dynamo would have to trace mamba_ssm's autotuned launchers."""
    from medlora import fused

    disable = torch.compiler.disable
    for name in ("ssd", "conv", "varlen_attention"):
        if getattr(kernels, name) is not None:
            setattr(kernels, name, disable(getattr(kernels, name)))
    if kernels.plan["norms"].kernel.startswith("mamba_ssm"):
        kernels.rms_norm, kernels.gated_rms_norm = disable(kernels.rms_norm), disable(kernels.gated_rms_norm)
    if kernels.moe is not None and kernels.plan["moe_activation"].kernel.startswith("medlora Triton"):
        kernels.moe = fused.MoeKernels(disable(kernels.moe.relu2), disable(kernels.moe.gather_sum))
    if kernels.grouped_gemm == "grouped_mm":
        if not _GROUPED_MM_OUTSIDE_GRAPHS:
            from transformers.integrations.moe import _grouped_mm

            _GROUPED_MM_OUTSIDE_GRAPHS.append(disable(_grouped_mm))
        kernels.grouped_gemm = "grouped_mm_eager"
    fused.keep_permutation_outside_graphs()
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(getattr(dynamo, "recompile_limit", 8), COMPILE_RECOMPILE_LIMIT)
    kernels.block_compute = torch.compile(block_compute, dynamic=True, backend=COMPILE_BACKEND)


def _gemm_kind(plan) -> str:
    return "loop" if plan["moe_grouped_gemm"].kernel.startswith("per-expert") else "grouped_mm"


def grouped_gemm_kind(device, dtype: torch.dtype) -> str:
    """`expert_gemm`'s kind for experts on `device` in `dtype`: `kernels.plan_fast`'s choice, so training,
    evaluation and generation of a 4-bit model follow one rule."""
    from medlora.kernels import gpu_facts, plan_fast

    cuda = torch.device(device).type == "cuda"
    capability = tuple(gpu_facts(device)["capability"]) if cuda else None
    return _gemm_kind(plan_fast(("grouped_lora_moe",), cuda, capability, str(dtype).replace("torch.", "")))


# ---------------------------------------------------------------- norms and router as pure functions
# Equal to NemotronHRMSNorm, Zamba2RMSNormGated and NemotronHTopkRouter (tested), written without `self`
# so one compiled graph serves every layer (compiling module methods would guard on each instance).


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float,
                   group_size: int) -> torch.Tensor:
    h = x.float() * F.silu(gate.float())
    grouped = h.view(*h.shape[:-1], h.shape[-1] // group_size, group_size)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return weight * grouped.view(h.shape).to(x.dtype)


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
          norm_topk_prob: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(top_k weights, top_k expert ids) of each token: sigmoid scores, group-limited top-k."""
    scores = F.linear(x.float(), weight.float()).sigmoid()
    choice = scores + bias
    n_experts = choice.shape[-1]
    group_scores = choice.view(-1, n_group, n_experts // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, n_experts // n_group).reshape(-1, n_experts)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    index = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, index)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, index


# ---------------------------------------------------------------- kernels: PyTorch references


def conv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stream: Stream) -> torch.Tensor:
    """Depthwise causal conv + SiLU over a [T, D] stream; taps never reach into the previous sequence."""
    width = weight.shape[1]
    out = x * weight[:, width - 1]
    for shift in range(1, width):
        shifted = F.pad(x[:-shift], (0, 0, shift, 0))
        out = out + shifted * weight[:, width - 1 - shift] * (stream.pos >= shift).unsqueeze(1).to(x.dtype)
    if bias is not None:
        out = out + bias
    return F.silu(out)


def ssd_reference(x, dt, A, B, C, D, seq_id, chunk: int) -> torch.Tensor:
    """Mamba2 SSD over one stream, chunked like mamba_ssm, with state resets at sequence starts.

    x [T, h, p], dt [T, h] (after softplus and clamp), A [h], B/C [T, h, n], D [h], seq_id [T]. fp32.
    """
    T, h, p = x.shape
    pad = (-T) % chunk
    if pad:  # padded tokens form their own sequence: nothing flows in or out of them
        x, dt, B, C = (F.pad(t, (0,) * (2 * t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
        seq_id = torch.cat([seq_id, seq_id.new_full((pad,), int(seq_id.max()) + 1)])
    nc = x.shape[0] // chunk
    x, dt, B, C, seq = (t.reshape(nc, chunk, *t.shape[1:]) for t in (x, dt, B, C, seq_id))
    cs = torch.cumsum(dt * A, dim=1)  # [nc, Q, h]
    same = (seq[:, :, None] == seq[:, None, :]) & torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    diff = cs[:, :, None, :] - cs[:, None, :, :]  # [nc, t, s, h]
    decay = torch.exp(diff.masked_fill(~same[..., None], float("-inf")))
    scores = torch.einsum("ctkn,cskn->ctsk", C, B) * decay * dt[:, None, :, :]
    y = torch.einsum("ctsk,cskp->ctkp", scores, x)
    # state each chunk leaves behind, counting only tokens of the chunk's last sequence
    last = seq[:, -1:]
    to_end = torch.exp(cs[:, -1:, :] - cs) * dt * (seq == last)[..., None]  # [nc, Q, h]
    chunk_state = torch.einsum("csk,cskp,cskn->ckpn", to_end, x, B)
    state = torch.zeros_like(chunk_state[0])
    carried = []
    for c in range(nc):
        carried.append(state)
        keeps = c > 0 and bool(seq[c, -1] == seq[c - 1, -1])  # the incoming sequence survives the whole chunk
        state = chunk_state[c] + (torch.exp(cs[c, -1])[:, None, None] * state if keeps else 0)
    carried = torch.stack(carried)  # [nc, h, p, n]: state entering each chunk
    prev_seq = torch.cat([seq.new_full((1,), -1), seq[:-1, -1]])  # sequence of the state entering each chunk
    enters = (seq == prev_seq[:, None])[..., None].to(x.dtype)  # [nc, Q, 1]
    y = y + torch.einsum("ctkn,ckpn->ctkp", C, carried) * (torch.exp(cs) * enters)[..., None]
    y = y + x * D[:, None]
    return y.reshape(nc * chunk, h, p)[:T]


# ---------------------------------------------------------------- mixers on a stream


def mamba_forward(mixer, x: torch.Tensor, stream: Stream, kernels: Kernels) -> torch.Tensor:
    T = x.shape[0]
    projected = mixer.in_proj(x)  # the LoRA-wrapped module: its adapter acts
    gate, xbc, dt = projected.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    weight, bias = mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias
    if kernels.conv is not None:
        xbc = kernels.conv(xbc.contiguous().unsqueeze(0), weight=weight, bias=bias, activation="silu",
                           cu_seqlens=stream.cu_seqlens_long, cu_seqlens_cpu=stream.cu_seqlens_host,
                           chunk_indices=stream.conv_chunk_indices())[0].squeeze(0)
    else:
        xbc = conv_reference(xbc, weight.to(xbc.dtype), None if bias is None else bias.to(xbc.dtype), stream)
    h, p, g, n = mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size
    xs, B, C = xbc.split([mixer.intermediate_size, g * n, g * n], dim=-1)
    A = -torch.exp(mixer.A_log.float())
    if kernels.ssd is not None:
        y = kernels.ssd(xs.reshape(1, T, h, p), dt.unsqueeze(0), A, B.reshape(1, T, g, n), C.reshape(1, T, g, n),
                        chunk_size=mixer.chunk_size, D=mixer.D, dt_bias=mixer.dt_bias,
                        seq_idx=stream.seq_idx, dt_softplus=True,
                        dt_limit=mixer.time_step_limit).squeeze(0)
    else:
        dt = F.softplus(dt + mixer.dt_bias.to(dt.dtype)).clamp(*mixer.time_step_limit).float()
        rep = h // g
        y = ssd_reference(xs.reshape(T, h, p).float(), dt, A,
                          B.reshape(T, g, n).float().repeat_interleave(rep, dim=1),
                          C.reshape(T, g, n).float().repeat_interleave(rep, dim=1),
                          mixer.D.float(), stream.seq_id, mixer.chunk_size)
    norm = mixer.norm
    y = kernels.gated_rms_norm(y.reshape(T, -1), gate, norm.weight, norm.variance_epsilon, norm.group_size)
    return mixer.out_proj(y.to(x.dtype))  # called as a module: a LoRA on out_proj is applied, never bypassed


def attention_forward(mixer, x: torch.Tensor, stream: Stream, kernels: Kernels) -> torch.Tensor:
    T, d = x.shape[0], mixer.head_dim
    q = mixer.q_proj(x).view(T, -1, d)
    k = mixer.k_proj(x).view(T, -1, d)
    v = mixer.v_proj(x).view(T, -1, d)
    rep = q.shape[1] // k.shape[1]
    if kernels.varlen_attention is not None and q.dtype in (torch.bfloat16, torch.float16):
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = kernels.varlen_attention(q, k, v, stream.cu_seqlens, stream.cu_seqlens, stream.max_len, stream.max_len,
                                       scale=mixer.scaling, window_size=(-1, 0))
    else:
        same = stream.seq_id[:, None] == stream.seq_id[None, :]
        mask = same & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                             v.transpose(0, 1).unsqueeze(0), attn_mask=mask, scale=mixer.scaling,
                                             enable_gqa=rep > 1)
        out = out.squeeze(0).transpose(0, 1)
    return mixer.o_proj(out.reshape(T, -1))


def _experts_and_lora(module):
    """The NemotronHExperts under PEFT's ParamWrapper chain, and {parameter: (B [E,out,r], A [E,r,in], scale)}."""
    from peft.tuners.lora.layer import ParamWrapper

    lora = {}
    while isinstance(module, ParamWrapper):
        active = [a for a in module.active_adapters if a in module.lora_A]
        if len(active) > 1:
            raise MedloraError("backend fast: more than one active LoRA adapter on the MoE experts is not supported")
        if active and not module.disable_adapters:
            lora[module.parameter_name] = module.get_delta_factors(active[0])
        module = module.base_layer  # one level: get_base_layer() would skip the next wrapper
    return module, lora


def expert_offsets(sorted_expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int32: where each expert's rows end among the routed rows sorted by expert (`_grouped_mm`'s `offs`).

    A binary search of the sorted ids, on the device: `torch.bincount` on CUDA reads the ids' min and max on the
    host (two syncs per MoE layer per forward, the GPU drained each time)."""
    bounds = torch.arange(num_experts, device=sorted_expert_ids.device, dtype=sorted_expert_ids.dtype)
    return torch.searchsorted(sorted_expert_ids, bounds, right=True).to(torch.int32)


def expert_gemm(kind: str, offsets: torch.Tensor):
    """`gemm(inputs [S, in] sorted by expert, weight [E, in, out]) -> [S, out]` for one MoE layer's routing,
    `offsets` as `expert_offsets` gives them.

    "grouped_mm": transformers' `_grouped_mm` (torch's CUTLASS grouped GEMM on sm90/sm100, its CPU kernel on
    CPUs). "loop": one GEMM per expert that has tokens; the token counts are copied to the host once here and
    shared by the layer's six GEMMs (on sm80 torch's own grouped_mm loops too, copying them on every call).

    The GEMM runs in the weight's dtype: the inputs are cast to it, never the weight to the inputs'. torch's
    CUTLASS kernel takes bf16 operands only; anything else falls back to a per-expert fp32 loop with a host
    copy of the offsets (on an H200 that fallback was 2/3 of the device time of a nano-full step, with the
    weights upcast to fp32 on every call). transformers' own grouped_mm path casts the same way.
    """
    if kind == "loop":
        sizes = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()  # the layer's one device-to-host sync
        used = [e for e, n in enumerate(sizes) if n]

        def gemm(inputs, weight):
            parts = inputs.to(weight.dtype).split(sizes)
            return torch.cat([parts[e] @ weight[e] for e in used])

        return gemm
    from transformers.integrations.moe import _grouped_mm

    mm = _GROUPED_MM_OUTSIDE_GRAPHS[0] if kind == "grouped_mm_eager" else _grouped_mm

    def gemm(inputs, weight):
        return mm(inputs.to(weight.dtype), weight, offsets)

    return gemm


# `_grouped_mm` kept out of compile_blocks' graphs (set by `compile_blocks`, not at import: torch.compiler.disable
# imports dynamo): it is one CUTLASS kernel already (inductor would autotune templates for it), and transformers'
# CPU fallback reads the offsets on the host, which AOTAutograd does not trace.
_GROUPED_MM_OUTSIDE_GRAPHS: list = []


def is_relu2(act_fn) -> bool:
    return type(act_fn).__name__ == "ReLUSquaredActivation"


def grouped_lora_experts(experts_module, x: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor, gemm_kind: str = "grouped_mm", moe=None) -> torch.Tensor:
    """Routed experts with LoRA as grouped low-rank products on the routed tokens only.

    moe: `medlora.fused.MoeKernels` (lever fused_moe): tokens to expert order and back by one gather-sum each way,
    and, when the experts' activation is relu² (Nemotron-H), relu² x routing weight in one pass: the weight then
    scales the down projection's input instead of its output (the projection is linear)."""
    from medlora.fused import Permutation

    experts, lora = _experts_and_lora(experts_module)
    k = top_k_index.shape[1]
    expert_ids, order = torch.sort(top_k_index.reshape(-1))
    permutation = Permutation(order, k, moe.gather_sum) if moe is not None else None
    routed = permutation.dispatch(x) if permutation is not None else x[order // k]
    gemm = expert_gemm(gemm_kind, expert_offsets(expert_ids, experts.num_experts))

    nf4 = nf4_weights(experts)  # --load_in_4bit: the experts are NF4 (medlora.quant), dequantised per GEMM

    def project(inputs, name):
        if name in nf4:
            out = nf4[name].gemm(gemm, inputs)
        else:
            out = gemm(inputs, getattr(experts, name).transpose(1, 2))  # [E, out, in], frozen
        if name in lora:
            lhs, rhs, scale = lora[name]  # delta_e = scale * lhs_e @ rhs_e: lhs [E, out, r], rhs [E, r, in]
            low = gemm(inputs, rhs.transpose(1, 2).contiguous())
            # the scale on the small factor, not on the [S, out] product: one pass over the routed rows fewer,
            # forward and backward (exact for the usual alpha = 2r; one rounding of the factor otherwise)
            out = out + gemm(low, (lhs.transpose(1, 2) * scale).contiguous())
        return out

    weights = top_k_weights.reshape(-1)[order]
    if moe is not None and is_relu2(experts.act_fn):
        out = project(moe.relu2(project(routed, "up_proj"), weights), "down_proj")
    else:
        hidden = experts.act_fn(project(routed, "up_proj"))
        out = project(hidden, "down_proj") * weights[:, None].to(hidden.dtype)
    if permutation is not None:
        return permutation.combine(out).to(x.dtype)
    # back to token order by the inverse permutation (a copy, no atomics), then each token's k outputs summed
    # (fp32 accumulation inside `sum`, one rounding) — as transformers' grouped_mm experts combine them. Outside
    # autocast, which would run the sum in fp32 and write an fp32 [tokens, hidden] copy to cast back.
    by_slot = torch.empty_like(out).index_copy_(0, order, out)
    with torch.autocast(x.device.type, enabled=False):
        return by_slot.view(x.shape[0], k, -1).sum(dim=1).to(x.dtype)


def route_quantized_experts(model) -> int:
    """Make each quantised experts module — or PEFT's LoRA wrapper around it, so call this after LoRA is
    attached — compute through `fast.grouped_lora_experts` when called as a module (the reference forward,
    generation, evaluation), so no path ever reads the placeholder as a weight. Returns the modules routed."""
    routed = 0
    for mixer in model.modules():
        if type(mixer).__name__ != "NemotronHMoE":
            continue
        outer = mixer.experts
        base, _ = _experts_and_lora(outer)
        if not nf4_weights(base):
            continue
        placeholder = getattr(base, "up_proj")
        kind = grouped_gemm_kind(placeholder.device, placeholder.dtype)

        def forward(hidden_states, top_k_index, top_k_weights, _outer=outer, _kind=kind):
            return grouped_lora_experts(_outer, hidden_states, top_k_index, top_k_weights, _kind)

        outer.forward = forward
        routed += 1
    return routed


def moe_forward(mixer, x: torch.Tensor, kernels: Kernels) -> torch.Tensor:
    gate = mixer.gate
    top_k_weights, top_k_index = kernels.route(x, gate.weight, gate.e_score_correction_bias, gate.top_k,
                                               gate.num_group, gate.topk_group, gate.norm_topk_prob,
                                               gate.routed_scaling_factor)
    latent = mixer.fc1_latent_proj(x)
    if kernels.grouped_lora_moe:
        with torch.profiler.record_function("medlora.moe.routed_experts"):
            routed = grouped_lora_experts(mixer.experts, latent, top_k_index, top_k_weights, kernels.grouped_gemm,
                                          kernels.moe)
    else:
        routed = mixer.experts(latent, top_k_index, top_k_weights)
    shared = mixer.shared_experts
    if kernels.moe is not None and is_relu2(shared.act_fn):  # NemotronHMLP: down(act(up(x))), LoRA on both
        shared_out = shared.down_proj(kernels.moe.relu2(shared.up_proj(x)))
    else:
        shared_out = shared(x)
    return mixer.fc2_latent_proj(routed) + shared_out


BLOCK_KIND = {"linear_attention": "mamba", "full_attention": "attention", "moe": "moe", "mlp": "mlp"}


def block_compute(block, x: torch.Tensor, stream: Stream, kernels: Kernels) -> torch.Tensor:
    """One block on the stream: x + mixer(norm(x)). What lever `compile_blocks` compiles, one graph per kind."""
    kind = BLOCK_KIND.get(block.block_type, block.block_type)
    normed = kernels.rms_norm(x.to(block.norm.weight.dtype), block.norm.weight, block.norm.variance_epsilon)
    if kind == "mamba":
        out = mamba_forward(block.mixer, normed, stream, kernels)
    elif kind == "attention":
        out = attention_forward(block.mixer, normed, stream, kernels)
    elif kind == "moe":
        out = moe_forward(block.mixer, normed, kernels)
    else:
        out = block.mixer(normed)
    return x + out


def block_forward(block, x: torch.Tensor, stream: Stream, kernels: Kernels) -> torch.Tensor:
    kind = BLOCK_KIND.get(block.block_type, block.block_type)
    # Under autocast PEFT's cast of each LoRA input to the fp32 adapter dtype is a round trip (autocast casts it
    # straight back to bf16 for the GEMM): two copies of the activations per LoRA layer, values unchanged. Set for
    # this block only (the checkpoint recompute runs this function again, under the same autocast state) and put
    # back after it, so a later forward outside fast (generation, no autocast) casts as PEFT does.
    lora_layers = getattr(block, "_medlora_lora_layers", ())
    for layer in lora_layers:
        layer.cast_input_dtype_enabled = not torch.is_autocast_enabled(x.device.type)
    try:
        with torch.profiler.record_function(f"medlora.{kind}"):  # names the block in a bench profile (`_origin`)
            return kernels.block_compute(block, x, stream, kernels)
    finally:
        for layer in lora_layers:
            layer.cast_input_dtype_enabled = True

# ---------------------------------------------------------------- checkpointed inputs offloaded to the host


@dataclass
class _OnHost:
    device: torch.device
    host: torch.Tensor  # pinned on a GPU machine
    index: int  # its place in the forward's order
    copied: Any = None  # CUDA event: the device-to-host copy is done
    back: torch.Tensor | None = None  # the copy back to the device, started one layer early
    arrived: Any = None  # CUDA event: `back` is complete


class HostOffload:
    """Lever `offload_checkpoints`: the input that each checkpointed block keeps for its recompute goes to pinned
    host memory during the forward and comes back in the backward, one layer ahead of its use (as Unsloth's
    offloaded checkpointing does). Both copies run on a side stream, so they overlap the layers' kernels.

    Installed as saved-tensor hooks around `torch.utils.checkpoint(use_reentrant=False)`: the checkpoint saves its
    inputs with `save_for_backward` outside its own hooks, so these see exactly the block inputs ([tokens, hidden]
    each); what a block saves inside is the checkpoint's (dropped, recomputed). Saves one [tokens, hidden] tensor
    per checkpointed block of GPU memory; costs two PCIe copies of it per step.
    """

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.order: list[_OnHost | None] = []  # this step's offloaded tensors, in forward order; None once used
        self.bytes = 0  # offloaded by the last forward

    def start_forward(self) -> None:
        self.order, self.bytes = [], 0

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, tensor: torch.Tensor):
        if tensor.numel() == 0 or not tensor.is_floating_point():  # the checkpoint's empty dummy
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=self.cuda)
        packed = _OnHost(tensor.device, host, len(self.order))
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the block's input is computed
            with torch.cuda.stream(self.stream):
                host.copy_(tensor, non_blocking=True)
                packed.copied = self.stream.record_event()
            tensor.record_stream(self.stream)  # its memory is not reused before the copy has read it
        else:
            host.copy_(tensor)
        self.order.append(packed)
        self.bytes += tensor.numel() * tensor.element_size()
        return packed

    def _to_device(self, packed: _OnHost) -> torch.Tensor:
        if packed.back is None:
            if self.cuda:
                with torch.cuda.stream(self.stream):
                    self.stream.wait_event(packed.copied)
                    packed.back = packed.host.to(packed.device, non_blocking=True)
                    packed.arrived = self.stream.record_event()
            else:
                packed.back = packed.host.to(packed.device)
        return packed.back

    def unpack(self, packed):
        if not isinstance(packed, _OnHost):
            return packed
        tensor = self._to_device(packed)
        if self.cuda:
            current = torch.cuda.current_stream(packed.device)
            current.wait_event(packed.arrived)
            tensor.record_stream(current)  # allocated on the side stream, used on this one
        before = self.order[packed.index - 1] if packed.index > 0 else None
        if before is not None:  # the backward goes through the blocks in reverse: start the one before on its way
            self._to_device(before)
        packed.back = None  # the recompute holds it now; a second backward would copy it again
        self.order[packed.index] = None  # the pinned buffer goes when autograd drops its saved tensor
        return tensor


# ---------------------------------------------------------------- the backbone forward


def _fast_backbone_forward(self, input_ids=None, inputs_embeds=None, position_ids=None, past_key_values=None,
                           use_cache=None, attention_mask=None, **kwargs):
    from transformers.modeling_outputs import BaseModelOutputWithPast

    if past_key_values is not None or use_cache or kwargs.get("output_hidden_states") \
            or (attention_mask is not None and attention_mask.dim() != 2):
        return self._medlora_reference_forward(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                               position_ids=position_ids, past_key_values=past_key_values,
                                               use_cache=use_cache, attention_mask=attention_mask, **kwargs)
    embeds = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
    b, length, hidden = embeds.shape
    kernels = self._medlora_kernels
    stream = make_stream((b, length), embeds.device, attention_mask, position_ids, kernels.stream_multiple)
    stream.derive_for(kernels)
    x = embeds.reshape(b * length, hidden)
    if stream.keep is not None:
        x = x[stream.keep]
    x = F.pad(x, (0, 0, 0, stream.pad))  # zero rows: finite through every norm, router and mixer
    checkpointed = self._medlora_checkpoint_blocks if self.training else ()
    offload = kernels.offload if checkpointed and torch.is_grad_enabled() else None
    if offload is not None:
        offload.start_forward()
    for block in self.layers:
        if BLOCK_KIND.get(block.block_type, block.block_type) in checkpointed:
            with offload.hooks() if offload is not None else contextlib.nullcontext():
                x = torch.utils.checkpoint.checkpoint(block_forward, block, x, stream, kernels, use_reentrant=False)
        else:
            x = block_forward(block, x, stream, kernels)
    x = kernels.rms_norm(x, self.norm_f.weight, self.norm_f.variance_epsilon)[:stream.tokens]
    if stream.keep is not None:
        x = x.new_zeros(b * length, hidden).index_copy_(0, stream.keep, x)
    return BaseModelOutputWithPast(last_hidden_state=x.reshape(b, length, hidden))


def backbone_of(model):
    """The NemotronHModel inside a PEFT / DDP wrapped model."""
    for module in model.modules():
        if type(module).__name__ == "NemotronHModel":
            return module
    raise MedloraError(f"backend fast supports Nemotron-H models only; {type(model).__name__} has no NemotronHModel")


def enable(model, levers: tuple[str, ...] = DEFAULT_LEVERS, gradient_checkpointing=False,
           arch: str = "auto") -> dict[str, Any]:
    """Switch one model instance to the fast forward; returns what runs where (and why, where it fell back).

    gradient_checkpointing: True (every block), False, or the block kinds to checkpoint (CHECKPOINT_BLOCKS).
    """
    if gradient_checkpointing is True:
        gradient_checkpointing = CHECKPOINT_BLOCKS
    blocks = tuple(gradient_checkpointing or ())
    unknown = set(blocks) - set(CHECKPOINT_BLOCKS)
    if unknown:
        raise MedloraError(f"fast checkpoint blocks: unknown {sorted(unknown)}; choose from {CHECKPOINT_BLOCKS}")
    if "offload_checkpoints" in levers and not blocks:
        raise MedloraError("fast lever offload_checkpoints moves the inputs of checkpointed blocks to the host: turn "
                           "on --gradient_checkpointing (or drop the lever)")
    backbone = backbone_of(model)
    first = next(backbone.parameters())
    kernels, notes = load_kernels(tuple(levers), first.device, arch, first.dtype)
    if not hasattr(backbone, "_medlora_reference_forward"):
        backbone._medlora_reference_forward = backbone.forward
    backbone._medlora_kernels = kernels
    backbone._medlora_checkpoint_blocks = blocks
    for block in backbone.layers:  # PEFT LoRA layers called as modules inside the block (see block_forward)
        block._medlora_lora_layers = [m for m in block.modules() if hasattr(m, "cast_input_dtype_enabled")
                                      and hasattr(m, "lora_A")]
    backbone.forward = types.MethodType(_fast_backbone_forward, backbone)
    for note in notes:
        print(note, flush=True)
    return {"levers": list(levers), "gpu_arch": arch, "kernels": kernels.describe(), "fallbacks": notes,
            "triton_unspecialized": list(kernels.unspecialized),
            "gradient_checkpointing": (f"per block (torch.utils.checkpoint): {'+'.join(blocks)}" if blocks else False)}


def disable(model) -> None:
    backbone = backbone_of(model)
    if hasattr(backbone, "_medlora_reference_forward"):
        backbone.forward = backbone._medlora_reference_forward


def patch_hf_mamba_ops() -> dict[str, Any]:
    """Give the *reference* transformers mixer Triton ops (bench variant `hf+triton`): fairness baseline.

    transformers' NemotronH mixer looks up `causal_conv1d_fn` and `mamba2_chunk_scan` in its module
    at call time; this swaps in fla-core's conv and mamba_ssm's SSD. Padding, PEFT's expert LoRA and
    the rest of the HF path stay as they are.
    """
    import transformers.models.nemotron_h.modeling_nemotron_h as nh

    try:
        ssd, conv = _load_mamba_ssm(True)["ssd"], _load_fla_conv()
    except (ImportError, MedloraError) as err:
        raise MedloraError(f"hf+triton needs mamba_ssm's Triton sources and fla-core ({err}); see README, "
                           "'Backend fast'") from None

    def conv_fn(x, weight, bias=None, activation=None, **_):  # HF layout [B, D, L]
        return conv(x.transpose(1, 2).contiguous(), weight=weight, bias=bias, activation=activation)[0].transpose(1, 2)

    def scan_fn(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None, dt_softplus=False,
                dt_limit=(0.0, float("inf")), return_final_states=False, z=None, **_):
        return ssd(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                   dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=return_final_states)

    nh.causal_conv1d_fn, nh.mamba2_chunk_scan = conv_fn, scan_fn
    return {"mamba_ssd": "mamba_ssm Triton (patched into transformers' mixer)",
            "mamba_conv": "fla-core Triton causal_conv1d (patched into transformers' mixer)"}
