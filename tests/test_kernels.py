"""Backend fast's kernels: the automatic, pinned, hash-checked kernel cache and the per-GPU kernel choice."""

import http.server
import importlib.util
import io
import sys
import tarfile
import threading
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from medlora import kernels

SHARED_SDIST = ROOT.parent / "shared" / "gpu" / "sdist" / kernels.MAMBA_SSM_FILE
LEVERS = ("triton_mamba", "triton_norms", "grouped_lora_moe", "fused_moe", "varlen_attention")


# ---------------------------------------------------------------- which kernel runs where


@pytest.mark.parametrize("capability, arch, gemm", [
    ((9, 0), "auto", "torch._grouped_mm"), ((10, 0), "auto", "torch._grouped_mm"),
    ((8, 0), "auto", "per-expert loop"), ((8, 6), "auto", "per-expert loop"), ((8, 9), "auto", "per-expert loop"),
    ((12, 0), "auto", "per-expert loop"), ((9, 0), "sm80", "per-expert loop")])
def test_gpu_plan_picks_a_grouped_gemm_per_architecture(capability, arch, gemm):
    plan = kernels.plan_fast(LEVERS, True, capability, "bfloat16", arch)
    assert plan["moe_grouped_gemm"].kernel.startswith(gemm)
    # everything else is the same on every architecture from sm80 on
    assert plan["mamba_ssd"].kernel.startswith("mamba_ssm Triton") and plan["mamba_conv"].kernel.startswith("fla-core")
    assert plan["attention"].kernel.startswith("torch varlen_attn") and plan["norms"].kernel.startswith("mamba_ssm Triton")
    assert plan["moe_activation"].kernel.startswith("medlora Triton")
    assert ("forced by --fast_gpu_arch sm80" in plan["moe_grouped_gemm"].reason) == (arch == "sm80")
    assert plan["moe_grouped_gemm"].fallback == (gemm == "per-expert loop")


def test_plan_explains_every_fallback():
    cpu = kernels.plan_fast(LEVERS + ("compile",), False, None, "float32")
    assert {c.kernel for p, c in cpu.items() if p.startswith("mamba")} == {"PyTorch reference"}
    assert cpu["attention"].kernel.startswith("SDPA") and all(c.fallback for p, c in cpu.items()
                                                              if p in ("mamba_ssd", "attention", "norms", "router"))
    fp32 = kernels.plan_fast(LEVERS, True, (9, 0), "float32")
    assert fp32["attention"].kernel.startswith("SDPA") and "float32" in fp32["attention"].reason
    assert fp32["moe_grouped_gemm"].kernel == "per-expert loop" and "bf16-only" in fp32["moe_grouped_gemm"].reason
    assert cpu["moe_activation"].kernel.startswith("PyTorch reference") and cpu["moe_activation"].fallback
    off = kernels.plan_fast((), True, (9, 0))
    assert off["moe_activation"].kernel.startswith("eager") and off["moe_activation"].reason == "lever fused_moe off"
    assert off["mamba_ssd"].reason == "lever triton_mamba off" and not off["mamba_ssd"].fallback
    assert off["moe_lora"].kernel.startswith("PEFT") and off["attention"].reason == "lever varlen_attention off"
    assert off["norms"].kernel == "eager" and off["router"].kernel == "eager" and not off["norms"].fallback
    compiled = kernels.plan_fast(("compile",), True, (9, 0))  # compile takes the norms only when Triton's are off
    assert compiled["norms"].kernel.startswith("torch.compile") and compiled["router"].kernel.startswith("torch.compile")
    both = kernels.plan_fast(LEVERS + ("compile",), True, (9, 0))
    assert both["norms"].kernel.startswith("mamba_ssm Triton") and both["router"].kernel.startswith("torch.compile")
    missing = kernels.plan_fast(LEVERS, True, (8, 0), unavailable={"mamba_ssd": "not cached"})
    assert missing["mamba_ssd"].kernel == "unavailable" and missing["mamba_ssd"].reason == "not cached"
    assert missing["norms"].kernel == "unavailable" and missing["norms"].fallback  # same cached files
    with pytest.raises(Exception, match="compute capability 8.0"):
        kernels.plan_fast(LEVERS, True, (7, 5))
    with pytest.raises(Exception, match="fast_gpu_arch"):
        kernels.plan_fast(LEVERS, True, (9, 0), arch="sm70")


def test_loop_gemm_equals_grouped_gemm_with_gradients():
    from medlora.fast import expert_gemm, expert_offsets

    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 0, 7])  # experts without tokens included
    ids = torch.repeat_interleave(torch.arange(6), counts)
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    w = torch.randn(6, 16, 8, requires_grad=True)
    outs = {}
    for kind in ("grouped_mm", "loop"):
        out = expert_gemm(kind, expert_offsets(ids, 6))(x, w)
        gx, gw = torch.autograd.grad(out, (x, w), torch.ones_like(out))
        outs[kind] = (out, gx, gw)
    for a, b in zip(outs["loop"], outs["grouped_mm"]):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("experts, tokens", [(8, 0), (8, 1), (8, 50), (128, 600), (4, 33)])
def test_expert_offsets_equal_the_cumulative_bincount_for_any_routing(experts, tokens):
    from medlora.fast import expert_offsets

    generator = torch.Generator().manual_seed(experts + tokens)
    for skew in (None, 0, experts - 1):  # uniform, everything on the first expert, everything on the last
        ids = torch.randint(0, experts, (tokens,), generator=generator) if skew is None else torch.full((tokens,), skew)
        ids = ids.sort().values
        want = torch.cumsum(torch.bincount(ids, minlength=experts), 0).to(torch.int32)
        got = expert_offsets(ids, experts)
        assert got.dtype == torch.int32 and torch.equal(got, want)


# ---------------------------------------------------------------- the kernel cache


def _sdist() -> tuple[bytes, str]:
    """The real pinned sdist when ../shared has it (and its imports, einops, are installed: `--extra fast`);
    otherwise a small stand-in with the same layout."""
    import importlib.util

    if SHARED_SDIST.exists() and importlib.util.find_spec("einops") is not None:
        return SHARED_SDIST.read_bytes(), kernels.MAMBA_SSM_SHA256
    buf = io.BytesIO()
    files = {"mamba_ssm/__init__.py": "import selective_scan_cuda\n",  # must never be imported
             "mamba_ssm/ops/__init__.py": "", "mamba_ssm/ops/triton/__init__.py": "",
             "mamba_ssm/ops/triton/ssd_combined.py": "from mamba_ssm.utils.torch import X\n"
                                                     "def mamba_chunk_scan_combined(*a, **k):\n    return X\n",
             "mamba_ssm/ops/triton/layer_norm.py": "from mamba_ssm.utils.torch import X\n"
                                                   "def rms_norm_fn(*a, **k):\n    return X\n",
             "mamba_ssm/ops/triton/layernorm_gated.py": "def rmsnorm_fn(*a, **k):\n    return 0\n",
             "mamba_ssm/utils/torch.py": "X = 42\n", "mamba_ssm/utils/determinism.py": "", "LICENSE": "Apache-2.0",
             "csrc/big.cu": "// not extracted"}
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"mamba_ssm-{kernels.MAMBA_SSM_VERSION}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    return data, kernels._sha256_bytes(data)


@pytest.fixture
def index_server(tmp_path):
    """A package index on localhost (PEP 503 page + file), like a PyPI mirror; PyPI itself made unreachable."""
    data, digest = _sdist()
    (tmp_path / "simple" / "mamba-ssm").mkdir(parents=True)
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / kernels.MAMBA_SSM_FILE).write_bytes(data)
    (tmp_path / "simple" / "mamba-ssm" / "index.html").write_text(
        f'<a href="../../files/{kernels.MAMBA_SSM_FILE}#sha256={digest}">{kernels.MAMBA_SSM_FILE}</a>')
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/simple", digest
    server.shutdown()


def test_automatic_setup_from_an_empty_cache(index_server, tmp_path, monkeypatch):
    index, digest = index_server
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("UV_DEFAULT_INDEX", index)
    monkeypatch.setattr(kernels, "MAMBA_SSM_SHA256", digest)
    monkeypatch.setattr(kernels, "MAMBA_SSM_URL", "http://127.0.0.1:9/unreachable.tar.gz")
    assert kernels.cached_mamba_ssm()[0] is None
    from medlora import fast

    fast._load_mamba_ssm.cache_clear()
    try:
        loaded = fast._load_mamba_ssm(True)  # the code path --backend fast takes on a GPU: downloads, checks, caches
    finally:
        fast._load_mamba_ssm.cache_clear()
    assert callable(loaded["ssd"]) and loaded["ssd"].__name__ == "mamba_chunk_scan_combined"
    assert loaded["rms_norm"].__name__ == "rms_norm_fn" and loaded["gated_rms_norm"].__name__ == "rmsnorm_fn"
    if SHARED_SDIST.exists() and importlib.util.find_spec("einops"):  # the real sources (_sdist): the chunk count
        assert loaded["unspecialized"] == sorted([  # layer_norm's is under an autotune and five heuristics
            "layer_norm._layer_norm_bwd_kernel.rows_per_program",
            "layernorm_gated._layer_norm_bwd_kernel.rows_per_program",
            "ssd_chunk_scan._chunk_scan_bwd_dstates_kernel.nchunks",
            "ssd_chunk_scan._chunk_scan_bwd_ddAcs_prev_kernel.nchunks",
            "ssd_state_passing._state_passing_bwd_kernel.nchunks",
            "ssd_state_passing._state_passing_fwd_kernel.nchunks"])
    folder, why = kernels.cached_mamba_ssm()
    assert folder == tmp_path / "cache" / "medlora" / "kernels" / f"mamba_ssm-{kernels.MAMBA_SSM_VERSION}", why
    assert not (folder / "mamba_ssm" / "__init__.py").exists() and not list(folder.rglob("*.cu"))
    # transformers must not see a mamba_ssm package (it would switch `hf` to CUDA-only kernels)
    from transformers.utils.import_utils import is_mamba_2_ssm_available

    assert not [m for m in sys.modules if m.split(".")[0] == "mamba_ssm"] and not is_mamba_2_ssm_available()
    # a changed cached file is noticed, and refetched
    target = folder / "mamba_ssm" / "ops" / "triton" / "ssd_combined.py"
    target.write_text(target.read_text() + "\n# edited\n")
    assert "changed since it was cached" in kernels.cached_mamba_ssm()[1]
    assert kernels.ensure_mamba_ssm() == folder and kernels.cached_mamba_ssm()[0] == folder


def test_offline_and_corrupt_downloads_say_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("UV_DEFAULT_INDEX", raising=False)
    monkeypatch.delenv("UV_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.setattr(kernels, "MAMBA_SSM_URL", "http://127.0.0.1:9/mamba_ssm-2.3.2.post1.tar.gz")
    with pytest.raises(kernels.KernelSetupError) as err:
        kernels.ensure_mamba_ssm()
    message = str(err.value)
    assert "\n" not in message and "medlora setup-kernels" in message and "--from" in message
    assert "not in the kernel cache" in message and "cannot download" in message
    bad = tmp_path / kernels.MAMBA_SSM_FILE
    bad.write_bytes(b"not the release")
    with pytest.raises(kernels.KernelSetupError, match="SHA-256 .* is not the pinned"):
        kernels.ensure_mamba_ssm(source=str(bad))
    assert kernels.cached_mamba_ssm()[0] is None  # nothing half-written is accepted


def test_setup_kernels_and_env_commands(tmp_path, monkeypatch, capsys):
    import json

    from medlora.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exit_:
        main(["setup-kernels", "--from", str(tmp_path / "missing.tar.gz")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("medlora: error:") == 1 and "cannot read it" in err
    if SHARED_SDIST.exists():
        main(["setup-kernels", "--from", str(SHARED_SDIST)])
        assert "SHA-256 checked" in capsys.readouterr().out
    main(["env", "--json", "true"])
    report = json.loads(capsys.readouterr().out)
    assert set(report["backends"]) == {"hf", "unsloth", "fast"}
    assert report["kernel_sources"]["fla-core"] and "grouped GEMM" in report["kernel_sources"]
    assert ("SHA-256 checked" in report["kernel_sources"]["mamba_ssm Triton ops"]) == SHARED_SDIST.exists()
    if not torch.cuda.is_available():
        assert report["backends"]["fast"]["mamba_ssd"].startswith("PyTorch reference — no CUDA device")
        assert report["backends"]["unsloth"]["ready"] is False
    main(["env"])
    text = capsys.readouterr().out
    assert "backend fast" in text and "moe_grouped_gemm" in text
