"""The data formats a channel may hold besides CSV / JSON Lines question-answer files: JSON arrays (Alpaca
records), chat JSONL (multi-turn, loss on every assistant turn), and Hugging Face datasets saved to disk; and the
row-numbered errors for bad records."""

from __future__ import annotations

import json

import pytest
from trainer import prompts
from trainer.data import Columns, DataReport, Example, load_channel
from trainer.errors import DataError

ALPACA = [
    {"instruction": "Summarise the text.", "input": "SageMaker trains models.", "output": "It trains models."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
]
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "What is SageMaker?"},
            {"role": "assistant", "content": "An AWS ML service."},
            {"role": "user", "content": "Who runs it?"},
            {"role": "assistant", "content": "Amazon."},
        ]
    },
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
]


def write(directory, name, content):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(content, encoding="utf-8")
    return path


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_alpaca_json_array_maps_instruction_input_output(tmp_path):
    write(tmp_path, "alpaca.json", json.dumps(ALPACA, indent=2))
    examples, report = load_channel(tmp_path)
    assert [(e.question, e.context, e.answer) for e in examples] == [
        ("Summarise the text.", "SageMaker trains models.", "It trains models."),
        ("Name a colour.", "", "Blue."),
    ]
    assert examples[0].source == "alpaca.json:row 1" and report.rows_kept == 2


def test_alpaca_input_is_rendered_as_dollys_input_block(tiny_plain_model_dir):
    """The Dolly format has the input after the instruction under `Input:`, as dolly-v2 was trained."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_plain_model_dir)
    prompts.prepare_tokenizer(tokenizer, "dolly")
    text = prompts.example_prompt(tokenizer, Example("Summarise the text.", "x", "SageMaker trains models."))
    assert text.endswith(
        "### Instruction:\nSummarise the text.\n\nInput:\nSageMaker trains models.\n\n### Response:\n"
    ), text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"instruction": "q", "output": "a"}, ["q", "a"]]', r"alpaca\.json: row 2 is not a JSON object"),
        (
            '[{"instruction": "q", "output": "a"}, {"instruction": "q2"}]',
            r"alpaca\.json:row 2: no field 'output'",
        ),
        (
            '[{"instruction": "q", "output": "a"}, {"instruction": ["q"], "output": "a"}]',
            r"alpaca\.json:row 2: column 'instruction' holds list",
        ),
        ('[{"instruction": "q", "output": "a"},]', r"alpaca\.json: not a valid JSON array"),
    ],
    ids=["not-an-object", "missing-field", "wrong-type", "broken-json"],
)
def test_bad_alpaca_records_name_file_row_and_field(tmp_path, content, message):
    write(tmp_path, "alpaca.json", content)
    with pytest.raises(DataError, match=message):
        load_channel(tmp_path)


def test_chat_jsonl_keeps_the_turns(tmp_path):
    write(tmp_path, "chat.jsonl", jsonl(CHAT))
    examples, _ = load_channel(tmp_path)
    first = examples[0]
    assert first.messages[0] == ("system", "You answer briefly.")
    assert len(first.messages) == 5
    assert (first.question, first.answer) == ("Who runs it?", "Amazon.")
    assert examples[1].source == "chat.jsonl:row 2"


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("not a list", r"chat\.jsonl:row 2: field 'messages' must be a non-empty list"),
        ([{"role": "user", "content": "q"}], r"chat\.jsonl:row 2: field 'messages' ends with a user turn"),
        (
            [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}],
            r"chat\.jsonl:row 2: field 'messages\[1\]'\.role is 'bot', expected one of system, user, assistant",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}],
            r"chat\.jsonl:row 2: field 'messages\[1\]'\.content is int, expected text",
        ),
        (
            [{"role": "assistant", "content": "a"}],
            r"chat\.jsonl:row 2: field 'messages\[0\]'\.role is 'assistant' where 'system' or 'user' belongs",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            r"field 'messages\[1\]'\.role is 'user' where 'assistant' belongs",
        ),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {"role": "system", "content": "s"},
            ],
            r"field 'messages\[2\]'\.role is 'system' where 'user' belongs",
        ),
    ],
    ids=["not-a-list", "no-answer", "unknown-role", "content-type", "assistant-first", "two-users", "late-system"],
)
def test_bad_chat_rows_name_file_row_and_field(tmp_path, messages, message):
    write(tmp_path, "chat.jsonl", jsonl([CHAT[1], {"messages": messages}]))
    with pytest.raises(DataError, match=message):
        load_channel(tmp_path)


def test_chat_row_with_an_empty_turn_is_counted_and_dropped(tmp_path):
    empty = {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}
    write(tmp_path, "chat.jsonl", jsonl([CHAT[1], empty]))
    examples, report = load_channel(tmp_path)
    assert len(examples) == 1 and report.empty_rows == ["chat.jsonl:row 2"]


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_plain_model_dir"], ids=["chat_template", "dolly"])
def test_multi_turn_labels_cover_exactly_the_assistant_turns(tmp_path, request, fixture):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(fixture))
    setup = prompts.prepare_tokenizer(tokenizer, prompts.choose_format("auto", tokenizer, "tiny"))
    write(tmp_path, "chat.jsonl", jsonl(CHAT[:1]))
    example = load_channel(tmp_path)[0][0]
    encoded = prompts.encode_example(tokenizer, example)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert len(ids) == len(labels)

    # The labelled spans, as text: each assistant turn's content and its end marker, nothing else.
    spans, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != prompts.IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    texts = [tokenizer.decode(span) for span in spans]
    assert len(texts) == 2, texts
    end = "\n\n### End" + tokenizer.eos_token if setup.format == "dolly" else tokenizer.eos_token
    assert texts == ["An AWS ML service." + end, "Amazon." + end]
    assert spans[-1][-1] == tokenizer.eos_token_id  # the example ends on EOS

    # The whole sequence is the conversation as the chat template renders it, up to the last EOS.
    full = tokenizer.apply_chat_template(prompts.conversation(example), tokenize=False)
    assert full.startswith(tokenizer.decode(ids))
    # The last prompt is what a server renders for the conversation so far.
    assert tokenizer.decode(ids).startswith(prompts.example_prompt(tokenizer, example))


def test_single_turn_encoding_is_a_one_turn_conversation(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts.prepare_tokenizer(tokenizer, "chat_template")
    plain = Example("What is SageMaker?", "An AWS ML service.", "Some context.")
    chat = Example(
        plain.question,
        plain.answer,
        messages=(("user", prompts.user_message(plain)["content"]), ("assistant", plain.answer)),
    )
    assert prompts.encode_example(tokenizer, plain) == prompts.encode_example(tokenizer, chat)


@pytest.mark.parametrize("kind", ["question_answer", "alpaca", "chat"])
def test_dataset_saved_to_disk(tmp_path, kind):
    from datasets import Dataset, DatasetDict

    records = {
        "question_answer": [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}],
        "alpaca": ALPACA,
        "chat": CHAT,
    }[kind]
    DatasetDict({"train": Dataset.from_list(records), "validation": Dataset.from_list(records[:1])}).save_to_disk(
        tmp_path / "ds"
    )
    train, report = load_channel(tmp_path / "ds")
    validation, _ = load_channel(tmp_path / "ds", report=DataReport(), split_name="validation")
    assert len(train) == 2 and len(validation) == 1
    assert report.files == ["ds[train]"] and train[1].source == "ds[train]:row 2"
    if kind == "chat":
        assert train[0].messages[-1] == ("assistant", "Amazon.")

    Dataset.from_list(records).save_to_disk(tmp_path / "plain")  # a Dataset, not a DatasetDict
    assert len(load_channel(tmp_path / "plain")[0]) == 2


def test_dataset_saved_to_disk_errors_name_the_split_and_row(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"a": Dataset.from_list(ALPACA), "b": Dataset.from_list(ALPACA)}).save_to_disk(tmp_path / "ds")
    with pytest.raises(DataError, match=r"has no 'train' split \(it has 'a', 'b'\)"):
        load_channel(tmp_path / "ds")

    bad = [CHAT[1], {"messages": [{"role": "user", "content": "q"}, {"role": "critic", "content": "a"}]}]
    Dataset.from_list(bad).save_to_disk(tmp_path / "chat")
    with pytest.raises(DataError, match=r"chat:row 2: field 'messages\[1\]'\.role is 'critic'"):
        load_channel(tmp_path / "chat")

    Dataset.from_list([{"prompt_text": "q", "reply": "a"}]).save_to_disk(tmp_path / "columns")
    with pytest.raises(DataError, match=r"unknown column 'question'.*question_column"):
        load_channel(tmp_path / "columns", Columns())


def test_chat_parquet(tmp_path):
    import pandas as pd

    pd.DataFrame(CHAT).to_parquet(tmp_path / "chat.parquet")
    examples, _ = load_channel(tmp_path)
    assert examples[0].messages[3] == ("user", "Who runs it?")
