import json

import torch

from conftest import SAMPLE, run_cli
from medlora.data import load_medmcqa
from medlora.evaluate import bootstrap_ci, score_rows, summarise
from medlora.formatting import LETTERS, FormatOptions, encode_choices


def brute_force_logprob(model, context, continuation):
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
    return sum(logp[len(context) + i - 1, t].item() for i, t in enumerate(continuation))


def test_batched_scores_equal_one_by_one_scoring(tiny):
    model, tok = tiny
    rows, _ = load_medmcqa(str(SAMPLE))
    rows = rows[:6]
    for style in ("plain", "chat"):
        options = FormatOptions(style)
        preds = score_rows(model, tok, rows, options, batch_size=4)  # padded batches of mixed lengths
        for row, pred in zip(rows, preds):
            context, continuations = encode_choices(tok, row, options)
            for letter, cont in zip(LETTERS, continuations):
                assert abs(pred["logprobs"][letter] - brute_force_logprob(model, context, cont)) < 1e-3
            assert pred["gold"] == LETTERS[row["cop"]]
            assert pred["pred"] == max(LETTERS, key=lambda x: pred["logprobs"][x])


def test_summary_statistics():
    preds = [{"correct": c, "subject": s, "gold": g, "pred": p}
             for c, s, g, p in [(True, "A", "A", "A"), (False, "A", "A", "B"), (True, "B", "C", "C"),
                                (True, "B", "A", "A")]]
    summary = summarise(preds, bootstrap_samples=200)
    assert summary["accuracy"] == 0.75 and summary["n"] == 4
    assert summary["per_subject"] == {"A": {"n": 2, "accuracy": 0.5}, "B": {"n": 2, "accuracy": 1.0}}
    assert summary["majority_letter"] == "A" and summary["majority_baseline"] == 0.75
    low, high = summary["ci95"]
    assert 0 <= low <= 0.75 <= high <= 1
    assert bootstrap_ci([True] * 10, 100) == (1.0, 1.0)


def test_eval_cli_on_real_dev_split(dev_path, tmp_path, tiny_dir):
    out = tmp_path / "eval"
    args = ["eval", "--model_name_or_path", str(tiny_dir), "--data", str(dev_path), "--limit", "300",
            "--output_dir", str(out), "--eval_batch_size", "16"]
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 300
    assert set(preds[0]) >= {"id", "gold", "pred", "logprobs"} and set(preds[0]["logprobs"]) == set(LETTERS)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 300 and 0 <= summary["accuracy"] <= 1 and summary["per_subject"]
    again = run_cli(args)  # outputs are never overwritten without asking
    assert again.returncode == 2 and "--overwrite" in again.stderr
