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

from medlora.errors import FormattingError  # noqa: F401 - re-exported

LETTERS = ("A", "B", "C", "D")
OPTION_FIELDS = ("opa", "opb", "opc", "opd")
STYLES = ("plain", "chat")
SYSTEM_PROMPT = (
    "You are a careful medical expert. Answer the multiple-choice question with the letter of the "
    "single best option first."
)
# lm-evaluation-harness joins context and continuation with this delimiter by default.
TARGET_DELIMITER = " "


THINK_TAGS = ("<think>", "</think>")
FORMAT_FILE = "medlora_format.json"  # in an adapter dir: how its prompts and answers were built (format_record)
# Where a pretrained model's documents end: the Nemotron-3 Base tokenizer declares eos <|im_end|> (id 11), which
# the Base model never trained (its embedding row is zero); its pretraining separator is </s> (id 2).
DOCUMENT_SEPARATORS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


@dataclass(frozen=True)
class FormatOptions:
    style: str = "plain"
    include_option_text: bool = True  # "A. <option text>" instead of just "A"
    include_explanation: bool = False  # append "\nExplanation: ..." when the row has one
    add_bos_token: bool | None = None  # None: the tokenizer's own default, as lm-evaluation-harness 0.4.13 encodes
    stop_token: str | None = None  # plain: the token that ends every answer (None: tokenizer.eos_token)
    enable_thinking: bool = False  # chat: passed to the template (Nemotron-3 then closes the think block itself)

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


def _render(tokenizer: Any, messages: list[dict[str, str]], options: FormatOptions, generation: bool) -> str:
    # enable_thinking is read by Nemotron-3's (and Qwen3's) templates and ignored by others
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                         enable_thinking=options.enable_thinking)


def build_prompt(row: dict[str, Any], options: FormatOptions, tokenizer: Any = None) -> str:
    """The text that precedes the answer, for training, evaluation and inference alike."""
    block = question_block(row)
    if options.style == "plain":
        return block
    require_chat_template(tokenizer)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": block}]
    return _render(tokenizer, messages, options, generation=True)


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


def _chat_turn(tokenizer: Any, prompt: str, row: dict[str, Any], content: str,
               options: FormatOptions) -> tuple[str, str]:
    """(what the template puts before the assistant content, what it puts after it) beyond the generation prompt.

    The trained span is the content and what follows it (end of turn). Text a template injects *before* the
    content (Nemotron-3 prepends `<think></think>` to assistant turns without one) is not trained: the prompt
    stays the generation prompt, which is what a server sends at inference.
    """
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": question_block(row)},
        {"role": "assistant", "content": content},
    ]
    full = _render(tokenizer, messages, options, generation=False)
    if not full.startswith(prompt):
        tail = prompt[-40:]
        raise FormattingError(
            f"the chat template renders the assistant turn differently from its generation prompt (which ends "
            f"{tail!r}); training and inference prompts would differ"
            + (" — with enable_thinking the generation prompt opens a think block the template does not render for "
               "a finished turn; leave --enable_thinking false" if options.enable_thinking else ""))
    completion = full[len(prompt):]
    idx = completion.rfind(content)
    if idx < 0:
        raise FormattingError("the chat template does not reproduce the assistant content verbatim")
    return completion[:idx], completion[idx + len(content):]


def chat_template_report(tokenizer: Any, options: FormatOptions) -> dict[str, Any]:
    """What the chat template does around an assistant turn (printed by `train`, kept in metrics.json)."""
    row = {"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d"}
    prompt = build_prompt(row, options, tokenizer)
    before, after = _chat_turn(tokenizer, prompt, row, "A. a", options)
    return {"enable_thinking": options.enable_thinking, "generation_prompt_ends_with": prompt[-40:],
            "think_tags_in_prompt": any(t in prompt for t in THINK_TAGS),
            "injected_before_content_not_trained": before, "after_content_trained": after}


def default_prefix(tokenizer: Any) -> list[int]:
    """The tokens the tokenizer puts before a text by default (its BOS, if it adds one)."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    if full[len(full) - len(plain):] != plain:
        raise FormattingError("the tokenizer appends special tokens after the text by default; medlora mirrors only "
                              "a leading BOS: pass --add_bos_token true or false explicitly")
    return full[: len(full) - len(plain)]


def bos_ids(tokenizer: Any, add_bos: bool | None, text: str = "") -> list[int]:
    """BOS for a prompt: the tokenizer's own default (None), or as forced; never twice (a template's own BOS)."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        return []  # the chat template already wrote it
    if add_bos is None:
        return default_prefix(tokenizer)
    if not add_bos:
        return []
    if tokenizer.bos_token_id is None:
        raise FormattingError("add_bos_token is set but the tokenizer has no BOS token")
    return [tokenizer.bos_token_id]


def encode_pair(tokenizer: Any, context: str, continuation: str,
                add_bos: bool | None = None) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness' `_encode_pair`: encode the whole string, split at the context length.

    Trailing whitespace of the context moves into the continuation, as the harness does. BOS follows the
    tokenizer's default unless `add_bos` forces it (lm-eval 0.4.13 encodes with the tokenizer's default too).
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    continuation_ids = whole[len(context_ids) :]
    context_ids = bos_ids(tokenizer, add_bos, context) + context_ids
    if not continuation_ids:
        raise FormattingError(f"continuation {continuation!r} encodes to no tokens")
    return context_ids, continuation_ids


def token_id(tokenizer: Any, token: str) -> int | None:
    """The id of `token` if it is one token of the vocabulary, else None."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(tid, int) or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return tid


def think_token_ids(tokenizer: Any) -> dict[int, str]:
    return {tid: tag for tag in THINK_TAGS if (tid := token_id(tokenizer, tag)) is not None}


def format_record(tokenizer: Any, options: FormatOptions, stop: dict[str, Any]) -> dict[str, Any]:
    """How prompts and answers were built: kept in metrics.json, the model card and adapter/medlora_format.json."""
    bos = bos_ids(tokenizer, options.add_bos_token)
    record = {"style": options.style, "include_option_text": options.include_option_text,
              "include_explanation": options.include_explanation,
              "add_bos_token": bool(bos),
              "bos_source": "tokenizer default" if options.add_bos_token is None else "--add_bos_token",
              "stop_token": options.stop_token, "stop": stop, "enable_thinking": options.enable_thinking}
    if options.style == "chat":
        record["chat_template"] = chat_template_report(tokenizer, options)
    return record


def options_from_record(record: dict[str, Any]) -> FormatOptions:
    """The FormatOptions an adapter was trained with (adapter/medlora_format.json)."""
    return FormatOptions(style=record["style"], include_option_text=record["include_option_text"],
                         include_explanation=record["include_explanation"], add_bos_token=record["add_bos_token"],
                         stop_token=record.get("stop_token"), enable_thinking=record.get("enable_thinking", False))


def plain_stop_id(tokenizer: Any, options: FormatOptions) -> int:
    if options.stop_token is None:
        if tokenizer.eos_token_id is None:
            raise FormattingError("the tokenizer has no EOS token; the model could never learn to stop "
                                  "(name one with --stop_token)")
        return tokenizer.eos_token_id
    tid = token_id(tokenizer, options.stop_token)
    if tid is None:
        raise FormattingError(f"--stop_token {options.stop_token!r} is not a single token of this tokenizer")
    return tid


def choose_stop_token(tokenizer: Any, style: str, requested: str, zero_rows) -> tuple[str | None, dict[str, Any]]:
    """(stop_token for FormatOptions, record) — the token that ends every trained answer, chosen explicitly.

    plain: `requested` if named, else the tokenizer's eos when the model has trained it, else the first document
    separator (</s>, ...) it has trained. `zero_rows(ids) -> {id: 'input embedding' | 'LM head' | ...}` names
    which of the token's weight rows are all zero (None when that cannot be checked). chat: the template's end
    of turn.
    """
    if style == "chat":
        if requested != "auto":
            raise FormattingError("--stop_token applies to --style plain; in chat style the chat template's "
                                  "end-of-turn token ends an answer")
        return None, {"style": "chat", "token": "the chat template's end of turn", "reason": "chat template"}
    eos = tokenizer.eos_token
    if requested != "auto":
        tid = token_id(tokenizer, requested)
        if tid is None:
            raise FormattingError(f"--stop_token {requested!r} is not a single token of this tokenizer")
        return requested, {"token": requested, "id": tid, "reason": "named by --stop_token"}
    candidates = [t for t in dict.fromkeys([eos, *DOCUMENT_SEPARATORS]) if t and token_id(tokenizer, t) is not None]
    if not candidates:
        raise FormattingError("the tokenizer has no EOS or document-separator token; name one with --stop_token")
    ids = {t: token_id(tokenizer, t) for t in candidates}
    zeros = zero_rows(list(ids.values()))
    if zeros is None:
        token = eos or candidates[0]
        return token, {"token": token, "id": ids[token], "reason": "the tokenizer's eos (weights not checked)"}
    for token in candidates:
        if not zeros.get(ids[token]):
            if token == eos:
                reason = "the tokenizer's eos; trained in this model"
            else:
                skipped = ", ".join(f"{t!r} (id {ids[t]}: all-zero {zeros[ids[t]]} row, never trained)"
                                    for t in candidates[:candidates.index(token)])
                reason = (f"document separator; the tokenizer's eos {skipped} — a model cannot learn to emit a token "
                          "whose rows are zero" if eos else "document separator (the tokenizer declares no eos)")
            return token, {"token": token, "id": ids[token], "reason": reason}
    raise FormattingError("none of the stop-token candidates " + ", ".join(f"{t!r}" for t in candidates)
                          + " has trained weights in this model (all-zero rows); name one with --stop_token")


def stop_token_ids(tokenizer: Any, options: FormatOptions) -> list[int]:
    """Token ids that end an answer: the stop token for plain; EOS plus the end-of-turn token for chat."""
    if options.style == "plain":
        return [plain_stop_id(tokenizer, options)]
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
        rest += _chat_turn(tokenizer, prompt, row, letter + rest, options)[1]
        rest_ids = tokenizer.encode(rest, add_special_tokens=False) if rest else []
    else:
        rest_ids = tokenizer.encode(rest, add_special_tokens=False) if rest else []
        rest_ids = rest_ids + [plain_stop_id(tokenizer, options)]
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
