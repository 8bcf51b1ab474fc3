"""Small, documented shims for gaps in the pinned libraries. Each is applied explicitly.

TRL 1.15's SFTTrainer always computes the loss through its fused LM head, whose per-token
log-probabilities come from a Triton kernel (`trl.kernels.ChunkedLogProbFunction`) with no CPU
path: on a machine without a GPU it fails with "0 active drivers". `patch_trl_cpu_loss` routes
CPU tensors to the same maths in plain PyTorch (log-softmax over the LM head's logits, with TRL's
temperature, logit scale and soft-capping) and leaves GPU tensors on TRL's kernel. The SFTTrainer
code around it (masking, normalisation by trained tokens, metrics) is untouched.
"""

from __future__ import annotations

import torch


class _CpuOrTritonLogProb:
    """Drop-in for `ChunkedLogProbFunction` (only `.apply` is used by TRL)."""

    def __init__(self, triton_fn):
        self.triton_fn = triton_fn

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        if hidden.device.type in ("cuda", "xpu") and self.triton_fn is not None:
            return self.triton_fn.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                        final_logit_softcapping, logit_scale, outputs)
        logits = torch.nn.functional.linear(hidden, weight, bias).float() * (logit_scale or 1.0)
        if final_logit_softcapping is not None:
            logits = final_logit_softcapping * torch.tanh(logits / final_logit_softcapping)
        logits = logits / temperature
        logp = torch.log_softmax(logits, dim=-1)
        log_probs = logp.gather(-1, targets[:, None]).squeeze(-1)
        probs = logp.exp()
        entropy = -(probs * logp).sum(-1) if "entropy" in outputs else None
        log_sum_sq = torch.logsumexp(2 * logp, dim=-1).detach() if "log_sum_sq_probs" in outputs else None
        mean_logits = logits.mean(-1).detach() if "mean_logits" in outputs else None
        is_top1 = (logits.argmax(-1) == targets) if "is_top1" in outputs else None
        return log_probs, entropy, log_sum_sq, mean_logits, is_top1


def patch_trl_cpu_loss() -> None:
    import trl.trainer.utils as trl_utils

    if not isinstance(trl_utils._ChunkedLogProbFunction, _CpuOrTritonLogProb):
        trl_utils._ChunkedLogProbFunction = _CpuOrTritonLogProb(trl_utils._ChunkedLogProbFunction)
