"""Fused elementwise kernels of backend `fast` (lever `fused_moe`): Triton on CUDA, PyTorch references elsewhere.

Nemotron-H's experts use relu² (`ReLUSquaredActivation`: relu, then `torch.square`). Under bf16 autocast
`torch.square` is a `pow`, which autocast runs in fp32: the [routed rows, 1856] activation is written in fp32,
cast back to bf16 for the down projection, and the backward walks the same fp32 copies (about nine passes over
the rows per routed-expert layer per step, forward and backward). The routing weight then scales the
[routed rows, 2688] down-projection output (two more passes, and two in the backward).

`relu2(x, row_scale)` does relu(x)² · row_scale in one pass (fp32 arithmetic, one rounding to x's dtype) and
its backward in one more (dx, and d(row_scale) as a row reduction). The routing weight moves in front of the
down projection, which is linear: down(relu²(u) · w) = down(relu²(u)) · w for the base weights and for LoRA.

`dispatch` / `combine` move rows between token order and expert order. Each token's k routed rows come back as
one sum `y[t] = sum_j rows[inv[t*k + j]]` (`gather_sum`: one pass, fp32 accumulation, one rounding) instead of a
scatter into slot order and a separate sum; the dispatch's backward is the same gather-sum, where eager autograd
accumulates the k gradients of each token with bf16 atomic adds (`index_put_`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def relu2_reference(x: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """relu(x)² (· row_scale[:, None]) in x's dtype, autocast or not: the values `ReLUSquaredActivation` gives."""
    with torch.autocast(x.device.type, enabled=False):
        y = torch.square(F.relu(x))
        return y if row_scale is None else y * row_scale.to(x.dtype)[:, None]


try:  # Triton ships with CUDA builds of torch; without it (CPU-only installs) the references run
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

if triton is not None:
    # Row and token counts change with every batch: not specialised on (Triton would compile a new variant the
    # first time a count is a multiple of 16: a one-off slow step in each new process). Widths are fixed.
    @triton.jit(do_not_specialize=["M"])
    def _relu2_forward_kernel(X, S, Y, M, N, HAS_SCALE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
        r = tl.maximum(tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32), 0.0)
        y = r * r
        if HAS_SCALE:
            y = y * tl.load(S + rows, mask=rows < M, other=0.0).to(tl.float32)[:, None]
        tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["M"])
    def _relu2_backward_kernel(X, S, G, DX, DS, M, N: tl.constexpr, HAS_SCALE: tl.constexpr, BM: tl.constexpr,
                               BN: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        row_mask = rows < M
        scale = tl.full([BM], 1.0, tl.float32)
        if HAS_SCALE:
            scale = tl.load(S + rows, mask=row_mask, other=0.0).to(tl.float32)
        total = tl.zeros([BM], dtype=tl.float32)
        for start in tl.static_range(0, N, BN):  # N (the width) is a constant: a few widths per model
            cols = start + tl.arange(0, BN)
            mask = row_mask[:, None] & (cols[None, :] < N)
            offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
            r = tl.maximum(tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32), 0.0)
            g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
            total += tl.sum(r * r * g, axis=1)
            tl.store(DX + offsets, (2.0 * r * g * scale[:, None]).to(DX.dtype.element_ty), mask=mask)
        if HAS_SCALE:
            tl.store(DS + rows, total, mask=row_mask)

    @triton.jit(do_not_specialize=["T"])
    def _gather_sum_kernel(SRC, INV, Y, T, D, K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
        tokens = tl.program_id(0) * BT + tl.arange(0, BT)
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        token_mask = tokens < T
        mask = token_mask[:, None] & (cols[None, :] < D)
        total = tl.zeros([BT, BD], dtype=tl.float32)
        for j in tl.static_range(K):
            rows = tl.load(INV + tokens * K + j, mask=token_mask, other=0).to(tl.int64)
            total += tl.load(SRC + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + tokens[:, None].to(tl.int64) * D + cols[None, :], total.to(Y.dtype.element_ty), mask=mask)


class _Relu2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, row_scale):
        x = x.contiguous()
        M, N = x.shape
        y = torch.empty_like(x)
        scale = row_scale.contiguous() if row_scale is not None else x  # a placeholder pointer when unscaled
        grid = (triton.cdiv(M, 32), triton.cdiv(N, 256))
        _relu2_forward_kernel[grid](x, scale, y, M, N, HAS_SCALE=row_scale is not None, BM=32, BN=256, num_warps=4)
        ctx.save_for_backward(x, row_scale)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, row_scale = ctx.saved_tensors
        M, N = x.shape
        grad = grad.contiguous()
        dx = torch.empty_like(x)
        has_scale = row_scale is not None
        ds = torch.empty(M, device=x.device, dtype=torch.float32) if has_scale else x
        _relu2_backward_kernel[(triton.cdiv(M, 16),)](x, row_scale.contiguous() if has_scale else x, grad, dx, ds,
                                                      M, N, HAS_SCALE=has_scale, BM=16, BN=256, num_warps=4)
        return dx, (ds.to(row_scale.dtype) if has_scale else None)


def relu2_triton(x: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`relu2_reference` as one Triton pass forward and one backward (x [..., N] on a CUDA device; row_scale one
    value per row of x viewed as [M, N])."""
    return _Relu2.apply(x.reshape(-1, x.shape[-1]), row_scale).view(x.shape)


# ---------------------------------------------------------------- token order <-> expert order


def gather_sum_reference(rows: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """[T, d]: y[t] = sum over j < k of rows[inverse[t*k + j]] (fp32 accumulation, one rounding)."""
    return rows.index_select(0, inverse).view(-1, k, rows.shape[-1]).sum(dim=1, dtype=torch.float32).to(rows.dtype)


def gather_sum_triton(rows: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    rows = rows.contiguous()
    T, D = inverse.numel() // k, rows.shape[-1]
    out = torch.empty(T, D, device=rows.device, dtype=rows.dtype)
    _gather_sum_kernel[(triton.cdiv(T, 16), triton.cdiv(D, 256))](rows, inverse, out, T, D, K=k, BT=16, BD=256,
                                                                  num_warps=4)
    return out


class _Dispatch(torch.autograd.Function):
    """routed[s] = x[token[s]]; backward: each token's k row gradients summed by `gather_sum`."""

    @staticmethod
    def forward(ctx, x, token, inverse, k, gather_sum):
        ctx.save_for_backward(inverse)
        ctx.k, ctx.gather_sum = k, gather_sum
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return ctx.gather_sum(grad, inverse, ctx.k), None, None, None, None


class _Combine(torch.autograd.Function):
    """y[t] = sum_j rows[inverse[t*k + j]]; backward: row s gets the gradient of its token, grad_y[token[s]]."""

    @staticmethod
    def forward(ctx, rows, token, inverse, k, gather_sum):
        ctx.save_for_backward(token)
        with torch.autocast(rows.device.type, enabled=False):
            return gather_sum(rows, inverse, k)

    @staticmethod
    def backward(ctx, grad):
        (token,) = ctx.saved_tensors
        return grad.index_select(0, token), None, None, None, None


class Permutation:
    """One MoE layer's routing order: row s of the expert-sorted rows is slot order[s] = token*k + choice."""

    def __init__(self, order: torch.Tensor, k: int, gather_sum=gather_sum_reference):
        self.order, self.k, self.gather_sum = order, k, gather_sum
        self.token = order // k
        self.inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))

    def dispatch(self, x: torch.Tensor) -> torch.Tensor:
        """[T, d] tokens -> [T*k, d] rows in expert order."""
        return _Dispatch.apply(x, self.token, self.inverse, self.k, self.gather_sum)

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        """[T*k, d] rows in expert order -> [T, d]: each token's k rows summed."""
        return _Combine.apply(rows, self.token, self.inverse, self.k, self.gather_sum)


def keep_permutation_outside_graphs() -> None:
    """Lever compile_blocks: `Permutation.dispatch` / `combine` run eagerly between torch.compile graphs. Traced
    into a graph by dynamo, their Functions gave the expert LoRA zero gradients (torch 2.11; caught by
    tests/test_fast.py::test_compiled_blocks_match_eager_with_one_graph_set_for_every_length). Done on first use,
    not at import: `torch.compiler.disable` imports dynamo (~2.7 s)."""
    for name in ("dispatch", "combine"):
        method = getattr(Permutation, name)
        if not getattr(method, "medlora_outside_graphs", False):
            eager = torch.compiler.disable(method)
            eager.medlora_outside_graphs = True
            setattr(Permutation, name, eager)


@dataclass(frozen=True)
class MoeKernels:
    """What lever `fused_moe` gives the routed experts: Triton on CUDA, the references elsewhere."""

    relu2: Any
    gather_sum: Any

    @classmethod
    def for_device(cls, cuda: bool) -> "MoeKernels":
        if cuda and triton is not None:
            return cls(relu2_triton, gather_sum_triton)
        return cls(relu2_reference, gather_sum_reference)
