"""The learning proof: the production training path really learns a MedMCQA-style task.

`medlora.train.train` (TRL SFTTrainer + PEFT LoRA on the random tiny Nemotron-H, CPU) is trained on
a synthetic multiple-choice task whose answer follows from the question, and MedMCQA accuracy on
held-out questions (log-likelihood of " A" .. " D", exactly as `medlora evaluate` scores) must rise
from chance to >= 95 %.

The task: four classes of eight keywords (cardiac, hepatic, endocrine, renal words). A question
strings eight keywords of one class together; the class fixes the answer letter (A, B, C, D). The
four options are distinct words from a neutral pool, so they carry no information. Each class is
its own `subject_name`, so the stratified split holds out a letter-balanced 20 % of questions;
held-out questions are new keyword sequences (question texts never repeat across splits).

Why these settings: the tiny model's frozen random LM head (std 0.02, width 64) caps how far any
logit can move, so the loss cannot fall much below ~6.4 nats; the letter *ranking* is what is
learned, and that is what accuracy measures. The random Mamba2 layers forget within a few tokens,
so the keywords reach the answer position through the attention layer; eight keywords per
question give it a strong enough signal. `include_option_text false` trains " A</s>" instead of
" A. <random word></s>", so every trained token is learnable (the scored letter is the same).
A learning rate above ~3e-3 makes LoRA on this model oscillate on the class-independent plateau
(loss ~6.77, accuracy at chance); 2e-3 converges in ~100 steps.
"""

import json
import random

import pytest

from medlora.data import normalise_key

CLASSES = {  # subject -> keywords; the class's position fixes the answer letter (A, B, C, D)
    "Cardiology": ["heart", "ventricular", "septal", "venous", "veins", "jugular", "platelet", "infarction"],
    "Hepatology": ["liver", "jaundice", "cholangitis", "cholecystitis", "duodenum", "pancreatitis", "glycogen",
                   "enzyme"],
    "Endocrinology": ["thyroid", "hormone", "pituitary", "gonad", "placental", "pregnancy", "menstrual", "infant"],
    "Nephrology": ["urine", "sodium", "potassium", "tubule", "filtered", "reabsorbed", "water", "hyperkalemia"],
}
OPTION_WORDS = ["light", "cells", "tissue", "protein", "virus", "vaccine", "weight", "health"]
KEYWORDS_PER_QUESTION = 8
ROWS_PER_CLASS = 100  # 400 questions: 320 train, 80 held out
SEED = 0

TRAIN_FLAGS = [
    "--max_steps", "120",
    "--per_device_train_batch_size", "16",
    "--learning_rate", "2e-3",
    "--warmup_steps", "5",
    "--lora_r", "16",
    "--lora_alpha", "32",
    "--include_option_text", "false",
    "--eval_fraction", "0.2",
    "--eval_accuracy_samples", "0",  # score every held-out question
    "--eval_strategy", "no",
    "--save_strategy", "no",
    "--logging_steps", "10",
    "--report_to", "none",
    "--dataloader_num_workers", "0",
    "--disable_tqdm", "true",
]


def synthetic_rows(seed: int) -> list[dict]:
    """MedMCQA rows in the official file format (cop 1-4), letters balanced, question texts unique."""
    rng = random.Random(seed)
    rows, seen = [], set()
    for letter, (subject, keywords) in enumerate(CLASSES.items()):
        while sum(r["subject_name"] == subject for r in rows) < ROWS_PER_CLASS:
            words = " ".join(rng.choice(keywords) for _ in range(KEYWORDS_PER_QUESTION))
            question = f"Patient with {words}: which option?"
            if normalise_key(question) in seen:
                continue
            seen.add(normalise_key(question))
            opa, opb, opc, opd = rng.sample(OPTION_WORDS, 4)
            rows.append({
                "id": f"syn-{len(rows):04d}", "question": question, "opa": opa, "opb": opb, "opc": opc, "opd": opd,
                "cop": letter + 1, "subject_name": subject,
                "exp": None if len(rows) % 2 else f"{subject} keywords point to option {'ABCD'[letter]}.",
                "topic_name": None, "choice_type": "single",
            })
    rng.shuffle(rows)
    return rows


def train_on_synthetic(tmp_path, tiny_cache_dir, seed: int = SEED, extra_flags=()) -> tuple[dict, tuple]:
    """Write the synthetic JSONL, build the arguments as the CLI does, run the real `train`."""
    from trl import SFTConfig

    from medlora.config import DataArguments, LoraArguments, ModelArguments, RunArguments, parse_config
    from medlora.train import train

    data_path = tmp_path / "synthetic_medmcqa.jsonl"
    data_path.write_text("".join(json.dumps(row) + "\n" for row in synthetic_rows(seed)), encoding="utf-8")
    args = parse_config([
        "--model_name_or_path", "tiny", "--tiny_cache_dir", str(tiny_cache_dir),
        "--data_path", str(data_path), "--output_dir", str(tmp_path / "run"), "--seed", str(seed),
        *TRAIN_FLAGS, *extra_flags,
    ], (ModelArguments, LoraArguments, DataArguments, RunArguments, SFTConfig))
    return train(*args), args


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory, tiny_dir):
    tmp_path = tmp_path_factory.mktemp("learn-hf")
    return tmp_path, *train_on_synthetic(tmp_path, tiny_dir)


@pytest.mark.timeout(900)
def test_lora_learns_a_synthetic_medmcqa_task_from_chance_to_95_percent(hf_run):
    from medlora.data import load_training_data

    tmp_path, metrics, (model_args, lora_args, data_args, run_args, train_args) = hf_run

    # The CPU defaults of parse_config applied, and the production loss path ran.
    assert train_args.use_cpu and not train_args.bf16 and train_args.optim == "adamw_torch"
    assert metrics["global_steps"] == 120

    # Held out: the eval questions are letter-balanced and none of their texts occurs in training.
    split = load_training_data(data_args)
    train_questions = {normalise_key(r["question"]) for r in split.train_rows}
    assert not any(normalise_key(r["question"]) in train_questions for r in split.eval_rows)
    assert metrics["eval_n"] == len(split.eval_rows) == 80
    assert metrics["majority_baseline"] == 0.25

    # From chance to (almost) perfect on questions never trained on.
    assert metrics["base_eval_accuracy"] <= 0.45, metrics["base_eval_accuracy"]
    assert metrics["eval_accuracy"] >= 0.95, (metrics["base_eval_accuracy"], metrics["eval_accuracy"])
    assert set(metrics["per_subject"]) == set(CLASSES)

    # The loss fell: the mean over training and the last logged window are below the first window.
    losses = [entry["loss"] for entry in metrics["log_history"] if "loss" in entry]
    assert len(losses) == 12
    assert metrics["train_loss"] < losses[0] and losses[-1] < losses[0] - 0.3, losses

    # The pre-flight audits ran, and the run wrote its adapter and metrics.
    assert set(metrics["audits"]) >= {"labels", "gradients"}
    assert metrics["audits"]["labels"]["trained_tokens"] > 0 and metrics["audits"]["gradients"]["lora_tensors"] > 0
    out = tmp_path / "run"
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    written = json.loads((out / "metrics.json").read_text())
    assert written["eval_accuracy"] == metrics["eval_accuracy"]
    assert written["base_eval_accuracy"] == metrics["base_eval_accuracy"]


@pytest.mark.timeout(900)
def test_backend_fast_reaches_the_same_accuracy_as_hf_from_the_same_seed(hf_run, tmp_path, tiny_dir):
    """Same seed, same data, same steps: `fast` (padding-free stream, grouped-LoRA MoE, reference Mamba2 on
    CPU) learns what `hf` learns. fp32 on CPU; the paths differ only in summation order."""
    _, hf_metrics, _ = hf_run
    metrics, _ = train_on_synthetic(tmp_path, tiny_dir, extra_flags=["--backend", "fast"])
    assert metrics["backend"] == "fast" and metrics["backend_report"]["levers"]
    assert metrics["eval_accuracy"] >= 0.95
    assert abs(metrics["eval_accuracy"] - hf_metrics["eval_accuracy"]) <= 1 / 80  # at most one question apart
    assert abs(metrics["train_loss"] - hf_metrics["train_loss"]) < 1e-3 * hf_metrics["train_loss"]
    assert metrics["base_eval_accuracy"] == hf_metrics["base_eval_accuracy"]
