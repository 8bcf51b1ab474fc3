import pytest

from medlora.formatting import (FormatOptions, FormattingError, build_prompt, encode_choices, encode_example,
                                render_example, stop_token_ids)

ROW = {"question": "Which nerve supplies the deltoid?", "opa": "Radial", "opb": "Axillary", "opc": "Ulnar",
       "opd": "Median", "cop": 1, "exp": "The axillary nerve (C5-C6) supplies deltoid and teres minor.",
       "id": "x", "subject_name": "Anatomy"}


def test_plain_prompt_is_lm_eval_medmcqa_doc_to_text():
    # lm-evaluation-harness tasks/medmcqa/utils_medmcqa.py doc_to_text, written out by hand
    expected = ("Question: Which nerve supplies the deltoid?\nChoices:\nA. Radial\nB. Axillary\nC. Ulnar\n"
                "D. Median\nAnswer:")
    assert build_prompt(ROW, FormatOptions("plain")) == expected


def test_training_letter_tokens_are_the_scored_tokens(tiny):
    _, tok = tiny
    for style in ("plain", "chat"):
        options = FormatOptions(style)
        example = encode_example(tok, ROW, options)
        context, continuations = encode_choices(tok, ROW, options)
        n_prompt = example["completion_mask"].index(1)
        assert example["input_ids"][:n_prompt] == context  # identical prompt for training and scoring
        gold = continuations[ROW["cop"]]
        assert example["input_ids"][n_prompt:n_prompt + len(gold)] == gold  # letter first, same tokens
        assert sum(example["completion_mask"]) > len(gold)  # option text follows the letter


def test_completion_ends_with_a_trained_stop_token(tiny):
    _, tok = tiny
    plain = encode_example(tok, ROW, FormatOptions("plain"))
    assert plain["input_ids"][-1] == tok.eos_token_id and plain["completion_mask"][-1] == 1
    chat = encode_example(tok, ROW, FormatOptions("chat"))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    trained = [t for t, m in zip(chat["input_ids"], chat["completion_mask"]) if m]
    assert im_end in trained and im_end in stop_token_ids(tok, FormatOptions("chat"))


def test_chat_prompt_uses_template_and_system_prompt(tiny):
    _, tok = tiny
    prompt = build_prompt(ROW, FormatOptions("chat"), tok)
    # the tiny template behaves as Nemotron-3's: with thinking off, the prompt closes the think block itself
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n<think></think>")
    assert "Question: Which nerve supplies the deltoid?" in prompt


def test_chat_style_without_template_is_a_clear_error(tiny):
    _, tok = tiny
    template = tok.chat_template
    tok.chat_template = None
    try:
        with pytest.raises(FormattingError, match="no chat template"):
            build_prompt(ROW, FormatOptions("chat"), tok)
    finally:
        tok.chat_template = template


def test_explanation_is_optional(tiny):
    _, tok = tiny
    with_exp = encode_example(tok, ROW, FormatOptions("plain", include_explanation=True))
    without = encode_example(tok, ROW, FormatOptions("plain"))
    assert sum(with_exp["completion_mask"]) > sum(without["completion_mask"])
    assert "Explanation: The axillary" in tok.decode(with_exp["input_ids"])


def test_render_marks_trained_span(tiny):
    _, tok = tiny
    text = render_example(tok, encode_example(tok, ROW, FormatOptions("plain")))
    assert text.startswith("Question:") and "Answer:« B. Axillary</s>»" in text


# ---------------------------------------------------------------- Nemotron-3 tokenizer traps


def lm_eval_encode_pair(tok, context, continuation):
    """lm-evaluation-harness 0.4.13 HFLM._encode_pair, whose tok_encode uses the tokenizer's special-token default."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


@pytest.mark.parametrize("adds_bos", [False, True])
def test_plain_encoding_is_lm_eval_s_on_tokenizers_with_and_without_bos(tiny, bos_tokenizer, adds_bos):
    from medlora.data import load_medmcqa
    from conftest import SAMPLE

    tok = bos_tokenizer if adds_bos else tiny[1]
    rows, _ = load_medmcqa(str(SAMPLE))
    for row in rows[:20]:
        context, continuations = encode_choices(tok, row, FormatOptions("plain"))
        for letter, cont in zip("ABCD", continuations):
            want_ctx, want_cont = lm_eval_encode_pair(tok, build_prompt(row, FormatOptions("plain")), " " + letter)
            assert (context, cont) == (want_ctx, want_cont)
        assert (context[0] == tok.bos_token_id) == adds_bos  # BOS exactly where the tokenizer adds it
        example = encode_example(tok, row, FormatOptions("plain"))
        assert example["input_ids"][:len(context)] == context  # training prompt = scoring prompt
    # the flag overrides the tokenizer's default either way
    forced = encode_choices(tok, ROW, FormatOptions("plain", add_bos_token=not adds_bos))[0]
    assert (forced[0] == tok.bos_token_id) == (not adds_bos)


def test_chat_answer_carries_no_injected_think_tags(tiny):
    from medlora.formatting import chat_template_report, think_token_ids

    _, tok = tiny
    think = think_token_ids(tok)
    assert len(think) == 2
    example = encode_example(tok, ROW, FormatOptions("chat"))
    n_prompt = example["completion_mask"].index(1)
    trained = example["input_ids"][n_prompt:]
    assert not set(trained) & set(think)  # the trained span: letter, option text, end of turn only
    assert tok.decode(trained) == "B. Axillary<|im_end|>\n"
    assert tok.decode(example["input_ids"][:n_prompt]).endswith("<|im_start|>assistant\n<think></think>")
    report = chat_template_report(tok, FormatOptions("chat"))
    assert report["think_tags_in_prompt"] and report["after_content_trained"] == "<|im_end|>\n"
    # a naive render of the whole conversation (what the template does by default) puts them in the answer
    naive = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "B"}],
                                    tokenize=False)
    assert "<think></think>B" in naive
    # asking for thinking makes the template open a block the finished turn does not render: refused, clearly
    with pytest.raises(FormattingError, match="enable_thinking"):
        encode_example(tok, ROW, FormatOptions("chat", enable_thinking=True))


def test_label_audit_reports_think_tags_inside_the_trained_span(tiny):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from medlora.audit import AuditError, audit_labels
    from medlora.formatting import think_token_ids

    _, tok = tiny
    row = {**ROW, "exp": "the deltoid is supplied by C5</think> axillary"}
    options = FormatOptions("chat", include_explanation=True)
    example = encode_example(tok, row, options)
    labels = [t if m else -100 for t, m in zip(example["input_ids"], example["completion_mask"])]
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)([{"input_ids": example["input_ids"],
                                                                             "labels": labels}])
    with pytest.raises(AuditError, match="think tag"):
        audit_labels(batch, [example["completion_mask"]], stop_token_ids(tok, options), think_token_ids(tok))
    clean = encode_example(tok, ROW, options)
    labels = [t if m else -100 for t, m in zip(clean["input_ids"], clean["completion_mask"])]
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)([{"input_ids": clean["input_ids"],
                                                                             "labels": labels}])
    audit_labels(batch, [clean["completion_mask"]], stop_token_ids(tok, options), think_token_ids(tok))


def test_stop_token_is_chosen_against_the_weights(base_trap_dir):
    from medlora.audit import AuditError, audit_trained_tokens, zero_weight_rows
    from medlora.config import ModelArguments
    from medlora.formatting import choose_stop_token
    from medlora.model import checkpoint_zero_rows, load_model

    model, tok = load_model(ModelArguments(model_name_or_path=str(base_trap_dir)))
    im_end, sep = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("</s>")
    assert tok.eos_token == "<|im_end|>"
    assert zero_weight_rows(model, [im_end, sep]) == {im_end: "input-embedding and LM-head"}
    for rows in (lambda ids: zero_weight_rows(model, ids), checkpoint_zero_rows(str(base_trap_dir))):
        token, record = choose_stop_token(tok, "plain", "auto", rows)
        assert token == "</s>" and record["id"] == sep and "never trained" in record["reason"]
    # the tokenizer's eos is kept where the model has trained it
    token, _ = choose_stop_token(tok, "plain", "auto", lambda ids: {})
    assert token == "<|im_end|>"
    # forcing the untrained eos: the token audit refuses, naming the token and the fix
    forced = FormatOptions("plain", stop_token="<|im_end|>")
    examples = [encode_example(tok, ROW, forced)]
    assert examples[0]["input_ids"][-1] == im_end
    with pytest.raises(AuditError, match=rf"{im_end} '<\|im_end\|>' \(the stop token\).*--stop_token auto") as err:
        audit_trained_tokens(model, tok, examples, [im_end])
    assert "\n" not in str(err.value)
    ok = audit_trained_tokens(model, tok, [encode_example(tok, ROW, FormatOptions("plain", stop_token="</s>"))], [sep])
    assert ok["trained_token_ids"] > 3
    with pytest.raises(FormattingError, match="not a single token"):
        choose_stop_token(tok, "plain", "<|nope|>", lambda ids: {})
