import copy

import pytest
import torch

from medlora.audit import AuditError, audit_gradients, audit_labels
from medlora.config import LoraArguments
from medlora.model import apply_lora

EOS = 2


def batch_from(ids_rows, label_rows):
    width = max(len(r) for r in ids_rows)
    ids = torch.zeros(len(ids_rows), width, dtype=torch.long)
    labels = torch.full((len(ids_rows), width), -100)
    for i, (r, l) in enumerate(zip(ids_rows, label_rows)):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(l)] = torch.tensor(l)
    return {"input_ids": ids, "labels": labels}


def test_label_audit_passes_on_a_correct_mask():
    batch = batch_from([[5, 6, 7, 8, EOS]], [[-100, -100, 7, 8, EOS]])
    assert audit_labels(batch, [[0, 0, 1, 1, 1]], [EOS])["trained_tokens"] == 3


@pytest.mark.parametrize("labels,mask,match", [
    ([-100, -100, -100, -100, -100], [0, 0, 1, 1, 1], "every label is -100"),
    ([5, -100, 7, 8, EOS], [0, 0, 1, 1, 1], "prompt tokens are trained"),
    ([-100, -100, 7, 8, -100], [0, 0, 1, 1, 0], "no stop token"),
    ([-100, -100, -100, 8, EOS], [0, 0, 1, 1, 1], "completion tokens are masked"),
])
def test_label_audit_catches_silent_failures(labels, mask, match):
    batch = batch_from([[5, 6, 7, 8, EOS]], [labels])
    with pytest.raises(AuditError, match=match):
        audit_labels(batch, [mask], [EOS])


def _batch(tokenizer):
    ids = torch.tensor([tokenizer.encode("Question: a?\nAnswer: A. b</s>")])
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "labels": labels}


def test_gradient_audit_passes_and_restores_state(tiny):
    model, tok = tiny
    peft_model = apply_lora(copy.deepcopy(model), LoraArguments(lora_r=4))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    rng = torch.random.get_rng_state()
    result = audit_gradients(peft_model, _batch(tok))
    assert result["lora_tensors"] == len(before)
    assert torch.equal(rng, torch.random.get_rng_state())
    for n, p in peft_model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]) and p.grad is None


def test_gradient_audit_catches_a_bypassed_adapter(tiny):
    model, tok = tiny
    peft_model = apply_lora(copy.deepcopy(model), LoraArguments(lora_r=4))
    # emulate a fused kernel that reads the base weight directly: this q_proj's LoRA never runs
    q_proj = peft_model.base_model.model.model.layers[3].mixer.q_proj
    q_proj.forward = lambda x, *a, **k: q_proj.base_layer(x)
    with pytest.raises(AuditError, match=r"got no gradient:\n.*q_proj"):
        audit_gradients(peft_model, _batch(tok))
