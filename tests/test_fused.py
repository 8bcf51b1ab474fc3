"""medlora.fused: the Triton relu² x routing-weight and gather-sum kernels against their PyTorch references.

On a CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, in a subprocess: the flag is read when
Triton is imported); the compiled kernel is checked on a GPU in tests/test_gpu_fast.py.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from medlora import fused

CASES = r"""
import json, torch
from medlora import fused

def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()

out = []
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for shape, scaled in (((37, 300), True), ((5, 1856), False), ((64, 17), True), ((3, 4, 40), False)):
        x = torch.randn(*shape, dtype=dtype)
        rows = x.numel() // shape[-1]
        scale = torch.rand(rows) if scaled else None
        grad = torch.randn(*shape, dtype=dtype)
        got, want = {}, {}
        for name, fn, store in (("triton", fused.relu2_triton, got), ("reference", fused.relu2_reference, want)):
            xi = x.clone().requires_grad_()
            si = scale.clone().requires_grad_() if scaled else None
            y = fn(xi, si)
            y.backward(grad)
            store.update(y=y.detach(), dx=xi.grad, ds=si.grad if scaled else None, dtype=y.dtype, shape=y.shape)
        out.append({"dtype": str(dtype), "shape": list(shape), "scaled": scaled,
                    "same_dtype": got["dtype"] == want["dtype"],
                    "same_shape": got["shape"] == want["shape"], "y": rel(got["y"], want["y"]),
                    "dx": rel(got["dx"], want["dx"]), "ds": rel(got["ds"], want["ds"]) if scaled else 0.0})
# dispatch / combine: the Triton gather-sum against eager indexing (x[token], index_copy + sum), with gradients
for dtype in (torch.float32, torch.bfloat16):
    for T, k, d, experts in ((13, 6, 300, 8), (40, 2, 17, 3), (1, 6, 64, 128)):
        index = torch.stack([torch.randperm(experts)[:k] for _ in range(T)]) if experts >= k else \
            torch.randint(0, experts, (T, k))
        order = torch.sort(index.reshape(-1)).indices
        x = torch.randn(T, d, dtype=dtype)
        grad = torch.randn(T, d, dtype=dtype)
        results = []
        for gather_sum in (fused.gather_sum_triton, None):
            xi = x.clone().requires_grad_()
            if gather_sum is None:
                rows = xi[order // k] * 1.5
                y = torch.empty_like(rows).index_copy_(0, order, rows).view(T, k, d).sum(1)
            else:
                permutation = fused.Permutation(order, k, gather_sum)
                y = permutation.combine(permutation.dispatch(xi) * 1.5)
            y.backward(grad)
            results.append((y.detach(), xi.grad))
        (y, dx), (want_y, want_dx) = results
        out.append({"dtype": str(dtype), "shape": [T, k, d], "scaled": False, "same_dtype": y.dtype == want_y.dtype,
                    "same_shape": y.shape == want_y.shape, "y": rel(y, want_y), "dx": rel(dx, want_dx), "ds": 0.0})
print(json.dumps(out))
"""


def test_moe_kernels_match_the_references_in_triton_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", CASES], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(cases) == 8 + 6
    for case in cases:
        tol = 1e-6 if case["dtype"] == "torch.float32" else 1e-2  # bf16: one rounding against two
        assert case["same_dtype"] and case["same_shape"], case
        assert case["y"] < tol and case["dx"] < tol and case["ds"] < max(tol, 1e-5), case


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu2_reference_equals_the_model_activation_times_the_weight(dtype):
    """The reference is transformers' ReLUSquaredActivation then the row weight, autocast or not."""
    from transformers.activations import ACT2FN

    torch.manual_seed(0)
    x, w = torch.randn(9, 33, dtype=dtype), torch.rand(9)
    want = ACT2FN["relu2"](x) * w.to(dtype)[:, None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused.relu2_reference(x, w)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(fused.relu2_reference(x), ACT2FN["relu2"](x))
