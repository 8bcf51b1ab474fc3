"""The one place where a MedMCQA question becomes model input.

Training, evaluation and `medlora ask` all call `build_prompt` and `encode_example` /
`encode_choices`, so the text the model is trained on and the text it is scored or queried on
cannot drift apart.

Two styles:
- ``plain``: exactly lm-evaluation-harness' ``medmcqa`` task prompt (``doc_to_text``) with the
  answer as a continuation after the harness' default target delimiter ``" "``. Use it for base
  models; scores are comparable with the Open Medical-LLM Leaderboard.
- ``chat``: the tokenizer's chat template with one fixed system prompt and the same question block
  as the user turn; the assistant turn starts with the answer letter. Use it for instruct models.

The answer letter always comes first in the completion, so a letter's log-likelihood after the
prompt is both the evaluation score and the first trained token(s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

LETTERS = ("A", "B", "C", "D")
OPTION_FIELDS = ("opa", "opb", "opc", "opd")
STYLES = ("plain", "chat")
SYSTEM_PROMPT = (
    "You are a careful medical expert. Answer the multiple-choice question with the letter of the "
    "single best option first."
)
# lm-evaluation-harness joins context and continuation with this delimiter by default.
TARGET_DELIMITER = " "


class FormattingError(ValueError):
    """A row or tokenizer cannot be formatted in the requested style."""


@dataclass(frozen=True)
class FormatOptions:
    style: str = "plain"
    include_option_text: bool = True  # "A. <option text>" instead of just "A"
    include_explanation: bool = False  # append "\nExplanation: ..." when the row has one
    add_bos_token: bool = False  # lm-eval's HF model does not add BOS by default

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise FormattingError(f"style must be one of {STYLES}, got {self.style!r}")


def question_block(row: dict[str, Any]) -> str:
    """lm-evaluation-harness `medmcqa` doc_to_text, character for character."""
    prompt = "Question: " + row["question"] + "\nChoices:\n"
    for letter, field in zip(LETTERS, OPTION_FIELDS):
        prompt += f"{letter}. {row[field]}\n"
    return prompt + "Answer:"


def require_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise FormattingError(
            f"tokenizer {name!r} has no chat template, so style 'chat' cannot be used; "
            "use style 'plain' (base models) or a tokenizer that ships a chat template"
        )


def build_prompt(row: dict[str, Any], options: FormatOptions, tokenizer: Any = None) -> str:
    """The text that precedes the answer, for training, evaluation and inference alike."""
    block = question_block(row)
    if options.style == "plain":
        return block
    require_chat_template(tokenizer)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": block}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def answer_prefix(letter: str, options: FormatOptions) -> str:
    """The continuation whose log-likelihood is scored: ' A' (plain) or 'A' (chat)."""
    return (TARGET_DELIMITER + letter) if options.style == "plain" else letter


def answer_rest(row: dict[str, Any], letter: str, options: FormatOptions) -> str:
    """What follows the letter in a training completion (before the end-of-turn/EOS)."""
    rest = ""
    if options.include_option_text:
        rest += ". " + row[OPTION_FIELDS[LETTERS.index(letter)]]
    explanation = (row.get("exp") or "").strip() if options.include_explanation else ""
    if explanation:
        rest += "\nExplanation: " + explanation
    return rest


def _chat_suffix(tokenizer: Any, prompt: str, row: dict[str, Any], content: str) -> str:
    """What the chat template puts after the assistant content (end-of-turn marker etc.)."""
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": question_block(row)},
        {"role": "assistant", "content": content},
    ]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise FormattingError(
            "the chat template renders the conversation differently from its generation prompt; "
            "training and inference prompts would differ"
        )
    completion = full[len(prompt) :]
    idx = completion.rfind(content)
    if idx < 0:
        raise FormattingError("the chat template does not reproduce the assistant content verbatim")
    return completion[idx + len(content) :]


def encode_pair(tokenizer: Any, context: str, continuation: str, add_bos: bool) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness' `_encode_pair`: encode the whole string, split at the context length.

    Trailing whitespace of the context moves into the continuation, as the harness does.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    continuation_ids = whole[len(context_ids) :]
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise FormattingError("add_bos_token is set but the tokenizer has no BOS token")
        context_ids = [tokenizer.bos_token_id] + context_ids
    if not continuation_ids:
        raise FormattingError(f"continuation {continuation!r} encodes to no tokens")
    return context_ids, continuation_ids


def stop_token_ids(tokenizer: Any, options: FormatOptions) -> list[int]:
    """Token ids that end an answer: EOS for plain, plus the end-of-turn token for chat."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if options.style == "chat":
        for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
            tid = tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
                ids.append(tid)
    return ids


def encode_example(tokenizer: Any, row: dict[str, Any], options: FormatOptions) -> dict[str, list[int]]:
    """Tokenise one training example: prompt tokens masked, completion tokens (letter first) trained.

    The letter is tokenised exactly as `encode_choices` tokenises it for scoring, so the first
    trained tokens are the scored tokens. The sequence ends with a stop token (EOS / end of turn).
    """
    letter = LETTERS[row["cop"]]
    prompt = build_prompt(row, options, tokenizer)
    prompt_ids, letter_ids = encode_pair(tokenizer, prompt, answer_prefix(letter, options), options.add_bos_token)
    rest = answer_rest(row, letter, options)
    if options.style == "chat":
        rest += _chat_suffix(tokenizer, prompt, row, letter + rest)
        rest_ids = tokenizer.encode(rest, add_special_tokens=False) if rest else []
    else:
        rest_ids = tokenizer.encode(rest, add_special_tokens=False) if rest else []
        if tokenizer.eos_token_id is None:
            raise FormattingError("the tokenizer has no EOS token; the model could never learn to stop")
        rest_ids = rest_ids + [tokenizer.eos_token_id]
    stops = stop_token_ids(tokenizer, options)
    if not any(t in stops for t in rest_ids[-2:]):
        raise FormattingError(f"completion does not end with a stop token ({stops}); it ends with {rest_ids[-2:]}")
    completion_ids = letter_ids + rest_ids
    return {
        "input_ids": prompt_ids + completion_ids,
        "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids),
    }


def encode_choices(
    tokenizer: Any, row: dict[str, Any], options: FormatOptions
) -> tuple[list[int], list[list[int]]]:
    """Context ids and one continuation per letter, for log-likelihood scoring."""
    prompt = build_prompt(row, options, tokenizer)
    context_ids = None
    continuations = []
    for letter in LETTERS:
        ctx, cont = encode_pair(tokenizer, prompt, answer_prefix(letter, options), options.add_bos_token)
        if context_ids is not None and ctx != context_ids:
            raise FormattingError("context tokenisation depends on the answer letter")
        context_ids = ctx
        continuations.append(cont)
    return context_ids, continuations


def render_example(tokenizer: Any, encoded: dict[str, Sequence[int]]) -> str:
    """Debug view: the masked prompt as plain text, each trained span inside «...»."""
    pieces, run, trained_run = [], [], None
    for tid, trained in zip(encoded["input_ids"], encoded["completion_mask"]):
        if trained_run is not None and bool(trained) != trained_run:
            text = tokenizer.decode(run)
            pieces.append(f"«{text}»" if trained_run else text)
            run = []
        run.append(tid)
        trained_run = bool(trained)
    if run:
        text = tokenizer.decode(run)
        pieces.append(f"«{text}»" if trained_run else text)
    return "".join(pieces)
