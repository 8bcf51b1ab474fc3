"""Backend fast's kernels: where they come from (pinned, hash-checked, cached) and which one runs on this GPU.

Sources. fla-core (Triton `causal_conv1d`) is a locked dependency of the `fast` extra. mamba_ssm's Triton SSD
(`mamba_chunk_scan_combined`) is not installed as a package: a `mamba_ssm` package makes transformers switch its
`hf` Nemotron-H path to CUDA-only fused kernels, and its `__init__` needs a CUDA build. Instead the pinned sdist
(PyPI file, SHA-256 below) is downloaded once, its Triton files only are extracted to the cache
(`~/.cache/medlora/kernels/`, or `$XDG_CACHE_HOME/medlora/kernels/`) with a manifest of their hashes, and
`medlora.fast` imports them from there without ever registering a `mamba_ssm` package. Offline, the cache is
filled from a copy of the file: `medlora setup-kernels --from mamba_ssm-2.3.2.post1.tar.gz`.

Selection. `plan_fast` is a pure function of the machine's facts (CUDA, compute capability, dtype, which
sources are available) and the requested levers, so the choice for an A100 can be tested on a CPU and forced on
an H200 (`--fast_gpu_arch sm80`) to measure the A100 path:

| part | sm90 / sm100 (H100, H200, B200) | sm80 / sm86 / sm89 (A100, A10, L40S) |
|---|---|---|
| Mamba2 SSD + conv | Triton (mamba_ssm, fla-core) | same Triton kernels |
| RMSNorm, gated RMSNorm | Triton (mamba_ssm) | same Triton kernels |
| attention | torch `varlen_attn` (FlashAttention-2) | same (FA2 supports sm80) |
| MoE grouped GEMM | `torch._grouped_mm` (CUTLASS grouped GEMM) | per-expert loop, one host sync per MoE layer |

torch 2.11 has CUTLASS grouped-GEMM kernels for sm90/sm100 only; elsewhere `torch._grouped_mm` itself loops over
the groups after copying the offsets to the host on every call. medlora's loop does the same work with one copy
per MoE layer (six grouped GEMMs share it), and it is the same code on every GPU, so it can be measured anywhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from medlora.errors import KernelSetupError, MedloraError

# mamba_ssm 2.3.2.post1 sdist on PyPI (the SHA-256 PyPI lists for it; checked against ../shared/gpu/sdist).
MAMBA_SSM_VERSION = "2.3.2.post1"
MAMBA_SSM_FILE = f"mamba_ssm-{MAMBA_SSM_VERSION}.tar.gz"
MAMBA_SSM_SHA256 = "104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028"
MAMBA_SSM_URL = ("https://files.pythonhosted.org/packages/af/48/aa7bec0efc7453fa0512276c0069c854bf684219050294266534"
                 f"bfef34bb/{MAMBA_SSM_FILE}")
# what the Triton SSD imports: ops/triton/*.py (not the Mamba-3 subpackage), two small utils, the licence
MAMBA_SSM_MEMBERS = ("mamba_ssm/ops/triton/", "mamba_ssm/utils/torch.py", "mamba_ssm/utils/determinism.py",
                     "LICENSE", "AUTHORS")
MANIFEST = "medlora_kernels.json"
FAST_GPU_ARCHS = ("auto", "sm80")
SETUP_HINT = (f"run `uv run medlora setup-kernels` where PyPI is reachable (it caches {MAMBA_SSM_FILE}'s Triton "
              "files), or copy the file here and run `uv run medlora setup-kernels --from PATH`")


# ---------------------------------------------------------------- cache


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medlora" / "kernels"


def mamba_ssm_dir(root: Path | None = None) -> Path:
    return (root or cache_root()) / f"mamba_ssm-{MAMBA_SSM_VERSION}"


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cached_mamba_ssm(root: Path | None = None) -> tuple[Path | None, str]:
    """(folder holding `mamba_ssm/`, '') when the cache is complete and unchanged, else (None, why not)."""
    folder = mamba_ssm_dir(root)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None, f"not in the kernel cache ({folder})"
    try:
        meta = json.loads(manifest.read_text(encoding="utf-8"))
        files = meta["files"]
    except (ValueError, KeyError, OSError) as err:
        return None, f"{manifest} unreadable ({err})"
    if meta.get("sdist_sha256") != MAMBA_SSM_SHA256:
        return None, f"{folder} was made from another file than the pinned {MAMBA_SSM_FILE}"
    for name, digest in files.items():
        path = folder / name
        try:
            if _sha256_bytes(path.read_bytes()) != digest:
                return None, f"{path} changed since it was cached"
        except OSError:
            return None, f"{path} is missing"
    return folder, ""


def extract_mamba_ssm(archive: bytes, root: Path | None = None) -> Path:
    """Check the sdist against the pinned SHA-256 and cache its Triton files (atomically; concurrent-safe)."""
    from filelock import FileLock

    digest = _sha256_bytes(archive)
    if digest != MAMBA_SSM_SHA256:
        raise KernelSetupError(f"{MAMBA_SSM_FILE}: SHA-256 {digest[:16]}… is not the pinned {MAMBA_SSM_SHA256[:16]}…; "
                               "the file is corrupt or not the release medlora was tested with")
    folder = mamba_ssm_dir(root)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if cached_mamba_ssm(root)[0] is not None:
            return folder
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
        try:
            files = {}
            prefix = f"mamba_ssm-{MAMBA_SSM_VERSION}/"
            with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
                for member in tar.getmembers():
                    name = member.name[len(prefix):] if member.name.startswith(prefix) else ""
                    wanted = any(name == m or (m.endswith("/") and name.startswith(m) and "/" not in name[len(m):])
                                 for m in MAMBA_SSM_MEMBERS)
                    if not (wanted and member.isfile()):
                        continue  # only regular files under known names: no links, no paths outside the folder
                    data = tar.extractfile(member).read()
                    target = tmp / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                    files[name] = _sha256_bytes(data)
            if "mamba_ssm/ops/triton/ssd_combined.py" not in files:
                raise KernelSetupError(f"{MAMBA_SSM_FILE} has no mamba_ssm/ops/triton/ssd_combined.py")
            (tmp / MANIFEST).write_text(json.dumps({"version": MAMBA_SSM_VERSION, "sdist": MAMBA_SSM_FILE,
                                                    "sdist_sha256": digest, "files": files}, indent=1))
            if folder.exists():
                shutil.rmtree(folder)  # a stale or changed cache entry that medlora wrote
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


def _index_urls() -> list[str]:
    """Where to look for the file: the configured package index (a mirror), then PyPI's own file URL."""
    urls = []
    for var in ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "PIP_INDEX_URL"):
        index = os.environ.get(var)
        if index and index.startswith(("http://", "https://")):
            urls.append(index.rstrip("/") + "/mamba-ssm/")
    return urls


def _download(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - https/http URLs only
        return response.read()


def download_mamba_ssm(timeout: float = 60.0) -> bytes:
    """The pinned sdist from the configured index (PEP 503 page) or PyPI; raises KernelSetupError naming why."""
    errors = []
    for page in _index_urls():
        try:
            parser = _Links()
            parser.feed(_download(page, timeout).decode("utf-8", "replace"))
            links = [h for h in parser.hrefs if h.split("#")[0].rsplit("/", 1)[-1] == MAMBA_SSM_FILE]
            if not links:
                errors.append(f"{page}: no {MAMBA_SSM_FILE}")
                continue
            return _download(urllib.request.urljoin(page, links[0].split("#")[0]), timeout)
        except (OSError, urllib.error.URLError, ValueError) as err:
            errors.append(f"{page}: {err}")
    try:
        return _download(MAMBA_SSM_URL, timeout)
    except (OSError, urllib.error.URLError, ValueError) as err:
        errors.append(f"{MAMBA_SSM_URL.split('/packages/')[0]}: {getattr(err, 'reason', err)}")
    raise KernelSetupError("cannot download " + MAMBA_SSM_FILE + " (" + "; ".join(errors) + ")")


def ensure_mamba_ssm(source: str | None = None, root: Path | None = None, download: bool = True) -> Path:
    """The cached Triton sources of mamba_ssm; fetched (and hash-checked) on first use.

    `source`: a local copy of the sdist to use instead of the network.
    """
    folder, why = cached_mamba_ssm(root)
    if folder is not None and source is None:
        return folder
    if source is not None:
        try:
            data = Path(source).expanduser().read_bytes()
        except OSError as err:
            raise KernelSetupError(f"--from {source}: cannot read it ({err.strerror or err})") from None
        return extract_mamba_ssm(data, root)
    if not download:
        raise KernelSetupError(f"mamba_ssm {MAMBA_SSM_VERSION} Triton kernels: {why}; {SETUP_HINT}")
    try:
        data = download_mamba_ssm()
    except KernelSetupError as err:
        raise KernelSetupError(f"backend fast needs mamba_ssm {MAMBA_SSM_VERSION}'s Triton kernels, {why}, and "
                               f"{err}; {SETUP_HINT}") from None
    return extract_mamba_ssm(data, root)


# ---------------------------------------------------------------- which kernel runs here


@dataclass(frozen=True)
class Choice:
    part: str
    kernel: str
    reason: str = ""
    fallback: bool = False  # the machine (not a lever) ruled out the faster kernel


def cutlass_grouped_gemm(capability: tuple[int, int] | None) -> bool:
    """torch 2.11 has CUTLASS bf16 grouped-GEMM kernels for sm90 and sm100 only."""
    return capability is not None and capability[0] in (9, 10)


def effective_capability(capability: tuple[int, int] | None, arch: str) -> tuple[int, int] | None:
    if arch == "sm80" and capability is not None:
        return min(capability, (8, 0))
    return capability


def plan_fast(levers: tuple[str, ...], cuda: bool, capability: tuple[int, int] | None, dtype: str = "bfloat16",
              arch: str = "auto", unavailable: dict[str, str] | None = None) -> dict[str, Choice]:
    """Which kernel backend fast uses for each part, and why; a pure function of the facts (tested on CPU).

    `unavailable`: part -> why its library cannot be used here (missing cache, missing package).
    """
    unavailable = unavailable or {}
    if arch not in FAST_GPU_ARCHS:
        raise MedloraError(f"--fast_gpu_arch must be one of {FAST_GPU_ARCHS}, got {arch!r}")
    cap = effective_capability(capability, arch) if cuda else None
    forced = " (forced by --fast_gpu_arch sm80)" if cuda and arch == "sm80" and capability != cap else ""
    plan: dict[str, Choice] = {}
    if cuda and cap is not None and cap < (8, 0):
        raise MedloraError(f"backend fast needs an NVIDIA GPU of compute capability 8.0 or newer (A100, H100, ...): "
                           f"this one is sm{cap[0]}{cap[1]} (no bf16 tensor cores for the Triton kernels); use "
                           "--backend hf")
    where = "no CUDA device" if not cuda else ""
    for part, lib in (("mamba_ssd", "mamba_ssm Triton mamba_chunk_scan_combined (seq_idx)"),
                      ("mamba_conv", "fla-core Triton causal_conv1d (cu_seqlens)")):
        if "triton_mamba" not in levers:
            plan[part] = Choice(part, "PyTorch reference", "lever triton_mamba off")
        elif not cuda:
            plan[part] = Choice(part, "PyTorch reference", where + ": the Triton kernels need a GPU", True)
        elif part in unavailable:
            plan[part] = Choice(part, "unavailable", unavailable[part], True)
        else:
            plan[part] = Choice(part, lib, "Triton, sm80 and newer")
    low_precision = dtype in ("bfloat16", "float16")
    if "varlen_attention" not in levers:
        plan["attention"] = Choice("attention", "SDPA + block-diagonal causal mask", "lever varlen_attention off")
    elif not cuda:
        plan["attention"] = Choice("attention", "SDPA + block-diagonal causal mask", where, True)
    elif not low_precision:
        plan["attention"] = Choice("attention", "SDPA + block-diagonal causal mask",
                                   f"flash attention takes bf16/fp16, the model is {dtype}", True)
    elif "attention" in unavailable:
        plan["attention"] = Choice("attention", "SDPA + block-diagonal causal mask", unavailable["attention"], True)
    else:
        plan["attention"] = Choice("attention", "torch varlen_attn (FlashAttention-2, cu_seqlens)",
                                   "FlashAttention-2 runs on sm80 and newer")
    if not cuda:
        gemm = Choice("moe_grouped_gemm", "transformers _grouped_mm (CPU)", where)
    elif dtype != "bfloat16":
        gemm = Choice("moe_grouped_gemm", "per-expert loop", f"CUDA grouped GEMM is bf16-only, the model is {dtype}",
                      True)
    elif cutlass_grouped_gemm(cap):
        gemm = Choice("moe_grouped_gemm", "torch._grouped_mm (CUTLASS grouped GEMM)",
                      f"sm{cap[0]}{cap[1]} has torch's CUTLASS grouped-GEMM kernels")
    else:
        gemm = Choice("moe_grouped_gemm", "per-expert loop (one host sync per MoE layer)",
                      f"sm{cap[0]}{cap[1]}{forced}: torch has no grouped-GEMM kernel here and would loop, syncing on "
                      "every call", True)
    plan["moe_grouped_gemm"] = gemm
    plan["moe_lora"] = (Choice("moe_lora", "grouped low-rank LoRA on routed tokens", "same GEMM as above")
                        if "grouped_lora_moe" in levers else
                        Choice("moe_lora", "PEFT target_parameters (W + BA for every expert)",
                               "lever grouped_lora_moe off"))
    if "fused_moe" not in levers:
        plan["moe_activation"] = Choice("moe_activation", "eager relu² (fp32 under autocast), routing weight on the "
                                        "output", "lever fused_moe off")
    elif not cuda:
        plan["moe_activation"] = Choice("moe_activation", "PyTorch reference relu² x routing weight (model dtype)",
                                        where + ": the Triton kernel needs a GPU", True)
    else:
        plan["moe_activation"] = Choice("moe_activation", "medlora Triton relu² x routing weight (one pass each way)",
                                        "Triton, sm80 and newer")
    compiled = "torch.compile(dynamic=True)"
    if "triton_norms" not in levers:
        plan["norms"] = (Choice("norms", compiled, "lever triton_norms off, lever compile on")
                         if "compile" in levers and cuda else Choice("norms", "eager", "lever triton_norms off"))
    elif not cuda:
        plan["norms"] = Choice("norms", "eager", where + ": the Triton kernels need a GPU", True)
    elif "mamba_ssd" in unavailable:  # the norms come from the same cached mamba_ssm files as the SSD
        plan["norms"] = Choice("norms", "unavailable", unavailable["mamba_ssd"], True)
    else:
        plan["norms"] = Choice("norms", "mamba_ssm Triton rms_norm_fn / rmsnorm_fn (group_size, gate)",
                               "Triton, sm80 and newer")
    if "compile" not in levers:
        plan["router"] = Choice("router", "eager", "lever compile off (default)")
    elif not cuda:
        plan["router"] = Choice("router", "eager", where + ": lever compile is for GPUs", True)
    else:
        plan["router"] = Choice("router", compiled, "lever compile on")
    plan["blocks"] = (Choice("blocks", "torch.compile(dynamic=True) of each block, its Triton kernels left out of "
                             "the graph", "lever compile_blocks on") if "compile_blocks" in levers else
                      Choice("blocks", "eager", "lever compile_blocks off (default)"))
    if "offload_checkpoints" not in levers:
        plan["checkpoint_offload"] = Choice("checkpoint_offload", "none", "lever offload_checkpoints off (default)")
    elif not cuda:
        plan["checkpoint_offload"] = Choice("checkpoint_offload", "a host copy (no memory saved)",
                                            where + ": offloading frees GPU memory only", True)
    else:
        plan["checkpoint_offload"] = Choice("checkpoint_offload", "pinned host memory, side-stream copies, one "
                                            "layer ahead", "lever offload_checkpoints on")
    return plan


def describe_plan(plan: dict[str, Choice]) -> dict[str, str]:
    return {part: c.kernel + (f" — {c.reason}" if c.reason else "") for part, c in plan.items()}


def gpu_facts(device=None) -> dict[str, Any]:
    """GPU name, compute capability, memory, CUDA; {'cuda': False} on a machine without one."""
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False}
    index = torch.device(device).index if device is not None and torch.device(device).index is not None else 0
    props = torch.cuda.get_device_properties(index)
    return {"cuda": True, "gpu": props.name, "capability": [props.major, props.minor],
            "memory_gib": round(props.total_memory / 2**30, 1), "cuda_version": torch.version.cuda}


# ---------------------------------------------------------------- `medlora env`


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment_report(levers: tuple[str, ...], arch: str = "auto") -> dict[str, Any]:
    """What this machine has and which kernel each backend will use, with the reason for every fallback.

    Nothing is downloaded or compiled: the kernel cache and the packages are only inspected.
    """
    import importlib.util

    import torch

    levers = tuple(levers)
    facts = gpu_facts()
    cuda = facts["cuda"]
    capability = tuple(facts["capability"]) if cuda else None
    folder, why = cached_mamba_ssm()
    fla = _version("fla-core")
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        varlen = None
    except ImportError as err:
        varlen = str(err)
    unavailable = {}
    if folder is None:
        unavailable["mamba_ssd"] = f"mamba_ssm {MAMBA_SSM_VERSION} Triton ops {why}: {SETUP_HINT}"
    if fla is None or importlib.util.find_spec("fla") is None:
        unavailable["mamba_conv"] = "fla-core is not installed: run `uv sync --extra fast`"
    if varlen:
        unavailable["attention"] = f"torch varlen_attn unavailable ({varlen})"
    sources = {
        "mamba_ssm Triton ops": f"{MAMBA_SSM_VERSION} in {folder} (SHA-256 checked)" if folder else f"missing: {why}",
        "fla-core": fla or "missing (uv sync --extra fast)",
        "triton": _version("triton") or "missing",
        "varlen flash attention": "torch.nn.attention.varlen.varlen_attn" if not varlen else f"missing ({varlen})",
        "grouped GEMM": ("torch._grouped_mm, CUTLASS kernels" if cutlass_grouped_gemm(capability) else
                         "torch._grouped_mm loops over the groups on this GPU" if cuda else "CPU kernel"),
    }
    try:
        plan = plan_fast(levers, cuda, capability, "bfloat16" if cuda else "float32", arch, unavailable)
        fast = describe_plan(plan)
        fast_ok = not any(c.kernel == "unavailable" for c in plan.values())
    except MedloraError as err:
        fast, fast_ok = {"all": str(err)}, False
    from transformers.utils.import_utils import is_causal_conv1d_available, is_mamba_2_ssm_available

    cuda_mamba = is_mamba_2_ssm_available() and is_causal_conv1d_available()
    hf_mamba = ("transformers' CUDA fused path (mamba_ssm + causal_conv1d CUDA builds installed; a LoRA on out_proj "
                "would be bypassed)" if cuda_mamba else
                "transformers' reference PyTorch path (no mamba_ssm / causal_conv1d CUDA builds; correct, slow)")
    experts = ("grouped_mm: " + sources["grouped GEMM"]) if cuda else "grouped_mm (CPU kernel)"
    backends = {
        "hf": {"mamba2": hf_mamba, "moe_experts": experts, "attention": "sdpa (padded batch)",
               "ready": True},
        "unsloth": {"installed": _version("unsloth") or "no (uv sync --extra unsloth)",
                    "ready": bool(cuda and _version("unsloth")),
                    "mamba2": hf_mamba + " (Unsloth keeps transformers' mixer)",
                    "why_not": None if cuda else "Unsloth imports only with an NVIDIA GPU"},
        "fast": {**fast, "ready": fast_ok, "levers": list(levers), "gpu_arch": arch},
    }
    return {
        "machine": {**facts, "torch": torch.__version__, "transformers": _version("transformers"),
                    "peft": _version("peft"), "trl": _version("trl"),
                    "sm": f"sm{capability[0]}{capability[1]}" if capability else None},
        "kernel_sources": sources, "backends": backends, "kernel_cache": str(cache_root()),
    }
