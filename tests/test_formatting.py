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
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
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
