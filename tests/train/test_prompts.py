import pytest
from fixtures.tiny_model import build_tiny_tokenizer
from trainer.data import Example
from trainer.prompts import (
    DOLLY_END,
    IGNORE_INDEX,
    CompletionCollator,
    choose_format,
    encode_example,
    prepare_tokenizer,
    prompt_text,
)


@pytest.fixture
def chat_tokenizer():
    return build_tiny_tokenizer(chat_template=True)


def test_pad_becomes_distinct_from_eos_and_examples_end_on_eos(chat_tokenizer):
    assert chat_tokenizer.pad_token_id == chat_tokenizer.eos_token_id  # as SmolLM2 ships
    setup = prepare_tokenizer(chat_tokenizer, "chat_template")
    assert chat_tokenizer.pad_token_id != chat_tokenizer.eos_token_id and setup.added_tokens == 0
    item = encode_example(chat_tokenizer, Example("What is X?", "X is Y."))
    assert item["input_ids"][-1] == chat_tokenizer.eos_token_id == item["labels"][-1]
    assert setup.stop_token_ids == (chat_tokenizer.eos_token_id,)


def test_loss_is_on_the_answer_only_and_prompt_matches_inference(chat_tokenizer):
    prepare_tokenizer(chat_tokenizer, "chat_template")
    item = encode_example(chat_tokenizer, Example("What is X?", "X is Y."))
    prompt = prompt_text(chat_tokenizer, "What is X?")
    prompt_ids = chat_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert item["input_ids"][:n] == prompt_ids
    assert item["labels"][:n] == [IGNORE_INDEX] * n
    answer = chat_tokenizer.decode(item["labels"][n:])
    assert answer == "X is Y.<|im_end|>"


def test_dolly_format_for_models_without_a_chat_template():
    tokenizer = build_tiny_tokenizer(chat_template=False)
    assert choose_format("auto", tokenizer, "some/base-model") == "dolly"
    assert choose_format("auto", build_tiny_tokenizer(), "databricks/dolly-v2-3b") == "dolly"
    prepare_tokenizer(tokenizer, "dolly")
    prompt = prompt_text(tokenizer, "What is X?")
    assert prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nWhat is X?\n\n### Response:\n"
    )
    item = encode_example(tokenizer, Example("What is X?", "Y.", context="Some context"))
    text = tokenizer.decode(item["input_ids"])
    assert "### Instruction:\nWhat is X?\n\nInput:\nSome context\n\n### Response:\nY.\n\n" + DOLLY_END in text
    assert item["input_ids"][-1] == tokenizer.eos_token_id


def test_collator_pads_right_with_ignored_labels():
    batch = CompletionCollator(pad_token_id=0)(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
            {"input_ids": [5], "labels": [5]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_a_gpt_neox_tokenizers_padding_token_is_the_pad_and_nothing_is_added():
    """dolly-v2's tokenizer: `<|endoftext|>` is EOS, `<|padding|>` is in the vocabulary but not set as pad."""
    tokenizer = build_tiny_tokenizer(chat_template=False)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|padding|>"]})
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.pad_token = None
    setup = prepare_tokenizer(tokenizer, "dolly")
    assert tokenizer.pad_token == "<|padding|>" and setup.added_tokens == 0  # no embedding resize


def test_a_several_token_dolly_end_marker_becomes_a_stop_string():
    tokenizer = build_tiny_tokenizer(chat_template=False)  # byte-level: "### End" is 7 tokens
    setup = prepare_tokenizer(tokenizer, "dolly")
    assert setup.stop_token_ids == (tokenizer.eos_token_id,) and setup.stop_strings == (DOLLY_END,)


def test_evaluation_cuts_answers_at_the_first_stop_string():
    from trainer.evaluation import cut_at_stop

    assert cut_at_stop("Yes.\n\n### End more", ["### End"]) == "Yes.\n\n"
    assert cut_at_stop("a STOP b END", ["END", "STOP"]) == "a "
    assert cut_at_stop("no marker", ["### End"]) == "no marker" == cut_at_stop("no marker", [])
