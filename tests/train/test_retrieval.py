"""Retrieval in the training image: the index and its artifact layout, the contract's scoring, the documents
channel, the chat template's `documents`, and the RAFT documents of the training examples."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fixtures.tiny_model import build_tiny_tokenizer
from trainer import retrieval
from trainer.config import RETRIEVAL_MIN_ROWS, TrainConfig
from trainer.data import Example
from trainer.errors import ConfigError, DataError
from trainer.prompts import (
    DOCUMENTS_PREAMBLE,
    IGNORE_INDEX,
    encode_example,
    example_prompt,
    prepare_tokenizer,
    prompt_text,
)
from trainer.retrieval import Passage, RetrievalIndex, passages_from_documents, passages_from_rows, raft_documents

from .conftest import faq_rows

DOCS = [{"title": "Pricing", "text": "You pay per second."}, {"title": "Regions", "text": "Most AWS Regions."}]


def _passages(pairs) -> list[Passage]:
    return [Passage(0, title, text, f"t.csv#{n}") for n, (title, text) in enumerate(pairs, start=1)]


# > The index: layout, round trip, scoring


def test_a_lexical_index_round_trip_writes_exactly_the_contract_layout(tmp_path):
    passages = passages_from_rows(
        [Example(q, a, source=f"faq.csv:row {n}") for n, (q, a) in enumerate(faq_rows(40), 1)]
    )
    index = RetrievalIndex.build(passages, k=4, dense=False)
    directory = index.save(tmp_path / "retrieval")

    assert sorted(p.name for p in directory.iterdir()) == [
        "bm25_text",
        "bm25_title",
        "passages.jsonl",
        "retrieval.json",
    ]
    import bm25s

    assert json.loads((directory / "retrieval.json").read_text()) == {
        "format_version": 1,
        "library": "bm25s",
        "bm25s_version": bm25s.__version__,
        "stopwords": "en",
        "stemmer": "english",
        "token_pattern": r"(?u)\b\w+\b",
        "field_weights": {"title": 1.0, "text": 1.0},
        "k": 4,
        "passages": 40,
    }
    lines = [json.loads(line) for line in (directory / "passages.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == list(range(40))
    assert lines[0] == {
        "id": 0,
        "title": "What is Amazon SageMaker?",
        "text": faq_rows(1)[0][1],
        "source": "faq.csv#1",  # data.py's "faq.csv:row 1"
    }
    for field in ("title", "text"):  # plain bm25s.BM25 indexes, loadable by anyone with the library
        assert bm25s.BM25.load(str(directory / f"bm25_{field}")).scores["num_docs"] == 40

    loaded = RetrievalIndex.load(directory)
    assert loaded.k == 4 and loaded.passages == index.passages
    for query in ("How much does SageMaker cost?", "which regions", "notebook instances GPU"):
        assert [(h.passage.id, h.score) for h in loaded.search(query, 5)] == [
            (h.passage.id, h.score) for h in index.search(query, 5)
        ]


def test_the_titles_embeddings_travel_with_the_index(tmp_path):
    from importlib.metadata import version

    import numpy as np

    passages = passages_from_rows(
        [Example(q, a, source=f"faq.csv:row {n}") for n, (q, a) in enumerate(faq_rows(12), 1)]
    )
    index = RetrievalIndex.build(passages, k=3)  # dense by default
    directory = index.save(tmp_path / "retrieval")
    assert sorted(p.name for p in directory.iterdir()) == [
        "bm25_text",
        "bm25_title",
        "dense_title.npy",
        "passages.jsonl",
        "retrieval.json",
    ]
    assert json.loads((directory / "retrieval.json").read_text())["dense"] == {
        "library": "wordllama",
        "library_version": version("wordllama"),
        "config": "l2_supercat",
        "dim": 256,
        "field_weights": {"title": 1.0},
    }
    vectors = np.load(directory / "dense_title.npy")
    assert vectors.dtype == np.float32 and vectors.shape == (12, 256)
    assert np.linalg.norm(vectors, axis=1) == pytest.approx(np.ones(12), rel=1e-5)
    loaded = RetrievalIndex.load(directory)
    for query in ("How much does SageMaker cost?", "Where can I use it?", "the"):
        assert [(h.passage.id, h.score) for h in loaded.search(query, 5)] == [
            (h.passage.id, pytest.approx(h.score)) for h in index.search(query, 5)
        ]


def test_embeddings_find_a_row_that_shares_no_word_with_the_question():
    rows = _passages(
        [
            ("How am I charged for SageMaker?", "You pay for the compute you use; there are no minimum fees."),
            ("Is my data encrypted?", "Yes, at rest and in transit, with AWS KMS keys."),
            ("How do I stop a notebook instance?", "Choose Stop in the console."),
        ]
    )
    query = "Is information kept secret?"
    assert RetrievalIndex.build(rows, dense=False).search(query, 3) == []  # no word in common: BM25 finds nothing
    assert RetrievalIndex.build(rows).search(query, 1)[0].passage.id == 1
    assert RetrievalIndex.build(rows).search("the of and", 3) == []  # no query terms: nothing, embeddings or not


def test_loading_embeddings_of_another_model_or_shape_names_what_differs(tmp_path):
    import numpy as np

    directory = RetrievalIndex.build(_passages([("a b", "c d"), ("e f", "g h")])).save(tmp_path / "r")
    settings = json.loads((directory / "retrieval.json").read_text())
    (directory / "retrieval.json").write_text(json.dumps({**settings, "dense": {**settings["dense"], "dim": 64}}))
    with pytest.raises(DataError, match=r"embeddings this trainer does not read.*dim"):
        RetrievalIndex.load(directory)
    (directory / "retrieval.json").write_text(json.dumps(settings))
    np.save(directory / "dense_title.npy", np.zeros((3, 256), np.float32))
    with pytest.raises(DataError, match=r"dense_title.npy: shape \(3, 256\)"):
        RetrievalIndex.load(directory)


def test_scoring_is_the_contracts_normalised_field_sum(tmp_path):
    # Every title and text is two tokens long, so BM25's length normalisation is the same for all, and a term's
    # score in a passage is idf(term) times a constant that the per-field normalisation divides out.
    index = RetrievalIndex.build(
        _passages(
            [
                ("cat dog", "fish bird"),  # title: cat + dog
                ("cat bird", "dog fish"),  # title: cat; text: dog
                ("fish bird", "cat dog"),  # text: cat + dog
                ("horse mouse", "horse mouse"),  # nothing in common with the query
            ]
        ),
        dense=False,
    )
    n = 4

    def idf(df: int) -> float:  # Lucene's BM25 idf, bm25s' default
        return math.log(1 + (n - df + 0.5) / (df + 0.5))

    # Titles: cat in 2, dog in 1 -> passage 0 has the maximum idf(2) + idf(1), passage 1 has idf(2).
    # Texts: cat in 1, dog in 2 -> passage 2 has the maximum, passage 1 has idf(2).
    share = idf(2) / (idf(2) + idf(1))
    hits = index.search("the cats and a dog", 10)  # stopwords dropped, "cats" stemmed to "cat"
    assert [h.passage.id for h in hits] == [0, 2, 1]  # 0 and 2 tie at 1.0: the lower id first; 3 scores 0
    assert [h.score for h in hits] == pytest.approx([1.0, 1.0, 2 * share], rel=1e-6)
    assert [h.passage.id for h in index.search("cat dog", 2)] == [0, 2]
    assert index.search("horse", 1)[0].passage.id == 3
    assert index.search("zebra", 3) == [] and index.search("the of and", 3) == [] and index.search("", 3) == []
    loaded = RetrievalIndex.load(index.save(tmp_path / "r"))
    assert [(h.passage.id, h.score) for h in loaded.search("the cats and a dog", 10)] == [
        (h.passage.id, h.score) for h in hits
    ]


# > The gate: no passages for a query without a clear best


GATE_ROWS = [
    ("How am I charged for notebooks?", "Per second of instance time."),
    ("How am I charged for training?", "Per second of training instance time."),
    ("Which regions have SageMaker?", "Most AWS Regions; see the regional services page."),
]


def test_the_gate_holds_back_every_passage_when_the_best_does_not_lead_by_the_margin(tmp_path):
    index = RetrievalIndex.build(_passages(GATE_ROWS), k=2, dense=False)
    clear, close = "Which regions have SageMaker?", "How am I charged?"
    assert index.margin(clear) > 1.0 and index.margin(close) < 0.1  # charged: two rows alike
    assert index.gate == retrieval.Gate()  # built without one: every query gets passages
    assert len(index.search(close, 2)) == 2

    index.gate = retrieval.Gate(0.5, "set by hand")
    assert index.search(clear, 2)[0].passage.id == 2
    assert index.search(close, 2) == [] and index.documents_for(close) == []
    assert len(index.search(close, 2, gated=False)) == 2  # RAFT's distractors rank ungated

    loaded = RetrievalIndex.load(index.save(tmp_path / "r"))
    assert json.loads((tmp_path / "r" / "retrieval.json").read_text())["gate"] == {
        "min_margin": 0.5,
        "calibration": "set by hand",
    }
    assert loaded.gate == index.gate and loaded.search(close, 2) == []
    index.gate = retrieval.Gate()
    assert "gate" not in json.loads((index.save(tmp_path / "r") / "retrieval.json").read_text())


@pytest.mark.parametrize("margin", [-1, "0.5", None, True])
def test_loading_a_gate_that_is_not_a_margin_names_it(tmp_path, margin):
    directory = RetrievalIndex.build(_passages(GATE_ROWS), dense=False).save(tmp_path / "r")
    settings = json.loads((directory / "retrieval.json").read_text())
    (directory / "retrieval.json").write_text(json.dumps({**settings, "gate": {"min_margin": margin}}))
    with pytest.raises(DataError, match=r"retrieval.json: gate.min_margin must be a number >= 0"):
        RetrievalIndex.load(directory)


def test_leaving_a_passage_out_scores_the_others_as_if_it_were_not_indexed():
    import numpy as np

    rows = _rows(12)
    index = RetrievalIndex.build(passages_from_rows(rows))
    without = RetrievalIndex.build(passages_from_rows(rows[:4] + rows[5:]))
    question = rows[4].question
    left_out = index.scores(question, exclude=4)
    assert left_out[4] == 0.0
    # The same ranking and nearly the same scores as an index without it (BM25's idf still counts it).
    others = np.delete(left_out, 4)
    assert list(np.argsort(-others, kind="stable")[:3]) == [h.passage.id for h in without.search(question, 3)]
    assert others == pytest.approx(without.scores(question), abs=0.05)
    assert index.margin(question, exclude=4) == pytest.approx(without.margin(question), abs=0.05)
    assert index.margin(question) > index.margin(question, exclude=4)  # its own row leads by far
    assert index.scores("the of and") is None and index.margin("the of and") is None


def test_the_calibrated_gate_sits_at_the_quantile_of_the_rows_left_out_margins():
    import numpy as np

    rows = _rows(retrieval.GATE_MIN_ROWS)
    index = RetrievalIndex.build(passages_from_rows(rows))
    gate = retrieval.calibrate_gate(index, range(len(rows)), seed=42)
    margins = index.leave_one_out_margins(range(len(rows)))
    assert len(margins) == len(rows)
    assert gate.min_margin > 0
    assert gate.min_margin == pytest.approx(np.quantile(margins, retrieval.GATE_QUANTILE), abs=1e-4)
    assert gate.calibration.startswith(f"quantile 0.75 of {len(rows)} training rows")
    # Each row's own question clears it; about a quarter of the left-out questions do.
    index.gate = gate
    assert all(index.search(r.question, 3) for r in rows)
    cleared = sum(m >= gate.min_margin for m in margins)
    assert cleared == pytest.approx(len(rows) / 4, abs=2)

    few = retrieval.calibrate_gate(index, range(retrieval.GATE_MIN_ROWS - 1), seed=42)
    assert few.min_margin == 0 and "fewer than 40" in few.calibration


def test_calibration_samples_at_most_its_query_budget(monkeypatch):
    rows = _rows(60)
    index = RetrievalIndex.build(passages_from_rows(rows), dense=False)
    monkeypatch.setattr(retrieval, "GATE_MAX_QUERIES", 45)
    asked = []
    real = index.leave_one_out_margins
    monkeypatch.setattr(index, "leave_one_out_margins", lambda ids: asked.extend(ids) or real(ids))
    gate = retrieval.calibrate_gate(index, range(60), seed=1)
    assert len(asked) == 45 == len(set(asked)) and asked == sorted(asked)
    assert retrieval.calibrate_gate(index, range(60), seed=1) == gate  # seeded


def test_build_numbers_the_passages_in_order_and_refuses_nothing():
    index = RetrievalIndex.build([Passage(7, "a b", "c", "x#1"), Passage(7, "d", "e f", "x#2")])
    assert [p.id for p in index.passages] == [0, 1]
    with pytest.raises(DataError, match="nothing to index"):
        RetrievalIndex.build([])


def test_documents_for_gives_evaluation_the_passages_as_dicts():
    index = RetrievalIndex.build(_passages([("cat dog", "fish"), ("bird", "cat")]), k=1, dense=False)
    [document] = index.documents_for("cat")
    assert document["id"] == 0 and document["title"] == "cat dog" and document["text"] == "fish"
    assert document["source"] == "t.csv#1" and document["score"] == pytest.approx(
        1.0
    )  # a title match; passage 1 ties on its text
    assert len(index.documents_for("cat", k=2)) == 2


def test_loading_an_index_of_another_format_names_what_differs(tmp_path):
    directory = RetrievalIndex.build(_passages([("a b", "c d")])).save(tmp_path / "r")
    settings = json.loads((directory / "retrieval.json").read_text())
    (directory / "retrieval.json").write_text(json.dumps({**settings, "stemmer": "porter"}))
    with pytest.raises(DataError, match="stemmer"):
        RetrievalIndex.load(directory)
    with pytest.raises(DataError, match=r"retrieval\.json is missing"):
        RetrievalIndex.load(tmp_path / "nowhere")


# > The documents channel


def _write(root: Path, files: dict[str, str | bytes]) -> Path:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return root


def _words(n: int, word: str = "word") -> str:
    return " ".join(f"{word}{i}" for i in range(n))


def test_markdown_is_split_at_headings_and_paragraphs(tmp_path):
    markdown = "\n".join(
        [
            "Preface text before any heading, a sentence or two.",
            "",
            "# Guide",
            "",
            "## Install",
            "",
            "Run pip install llmft.",  # short paragraphs of one section are merged into one passage
            "",
            "Then run make venv.",
            "",
            "```bash",
            "# a comment in code, not a heading",
            "",
            "make test",
            "```",
            "",
            "## Train",
            "",
            _words(400, "t"),  # one long paragraph: split into pieces of at most 150 words
            "",
            "### On a GPU ###",
            "",
            "Use an ml.g5 instance.",
        ]
    )
    channel = _write(tmp_path / "documents", {"guides/setup.md": markdown, "notes.txt": "# not a heading\n\nplain"})
    passages = passages_from_documents(channel)

    assert [(p.title, p.source) for p in passages] == [
        ("setup.md", "guides/setup.md#p1"),
        ("setup.md: Guide > Install", "guides/setup.md#p2"),
        ("setup.md: Guide > Train", "guides/setup.md#p3"),
        ("setup.md: Guide > Train", "guides/setup.md#p4"),
        ("setup.md: Guide > Train", "guides/setup.md#p5"),
        ("setup.md: Guide > Train > On a GPU", "guides/setup.md#p6"),
        ("notes.txt", "notes.txt#p1"),  # plain text: `#` starts no heading, and short paragraphs merge
    ]
    assert passages[1].text == (
        "Run pip install llmft.\n\nThen run make venv.\n\n```bash\n# a comment in code, not a heading\n\nmake test\n```"
    )
    train = [len(p.text.split()) for p in passages[2:5]]
    assert sum(train) == 400 and max(train) <= 150 and min(train) >= 40
    assert passages[6].text == "# not a heading\n\nplain"


def test_short_paragraphs_merge_up_to_the_passage_size(tmp_path):
    paragraphs = [_words(30, f"p{n}w") for n in range(10)]  # 300 words in paragraphs of 30
    [*passages] = passages_from_documents(_write(tmp_path, {"a.md": "\n\n".join(paragraphs)}))
    sizes = [len(p.text.split()) for p in passages]
    assert sum(sizes) == 300 and all(40 <= s <= 150 for s in sizes), sizes
    assert all("\n\n" in p.text for p in passages)  # paragraphs kept apart inside a passage


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"bad.md": b"caf\xe9 au lait"}, r"bad\.md: not UTF-8 text \(byte 3\)"),
        ({"good.md": "text", "empty.txt": "  \n\n"}, r"empty\.txt: the document is empty"),
        ({"only-headings.md": "# A\n\n## B\n"}, r"only-headings\.md: the document holds no text"),
        ({"good.md": "text", "manual.pdf": b"%PDF-1.7"}, r"manual\.pdf: the documents channel takes plain-text"),
        ({".hidden.md": "text"}, r"no document in .*documents"),
    ],
)
def test_bad_documents_fail_naming_the_file(tmp_path, files, message):
    channel = _write(tmp_path / "documents", files)
    with pytest.raises(DataError, match=message) as failure:
        passages_from_documents(channel)
    assert failure.value.exit_code == 2  # a data error: the job exits 2, output/failure says what to fix


# > The chat template with and without documents


@pytest.fixture(params=["chat_template", "dolly"])
def prompt_format(request):
    return request.param


def _tokenizers(prompt_format: str):
    """The same tokenizer prepared without and with retrieval."""
    chat = prompt_format == "chat_template"
    plain, with_docs = build_tiny_tokenizer(chat_template=chat), build_tiny_tokenizer(chat_template=chat)
    prepare_tokenizer(plain, prompt_format)
    setup = prepare_tokenizer(with_docs, prompt_format, documents=True)
    assert setup.documents and with_docs.chat_template.startswith(DOCUMENTS_PREAMBLE)
    return plain, with_docs


EXAMPLES = [
    Example("What is X?", "X is Y."),
    Example("Summarise.", "Short.", context="A long text."),
    Example(
        "And Z?",
        "Z too.",
        messages=(
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello"),
            ("user", "And Z?"),
            ("assistant", "Z too."),
        ),
    ),
]


def test_without_documents_the_template_renders_byte_for_byte_as_before(prompt_format):
    plain, with_docs = _tokenizers(prompt_format)
    assert DOCUMENTS_PREAMBLE not in plain.chat_template  # the default, as the base variant is packaged
    for example in EXAMPLES:
        assert example_prompt(with_docs, example) == example_prompt(plain, example)
        assert encode_example(with_docs, example) == encode_example(plain, example)
        assert example_prompt(with_docs, example, documents=[]) == example_prompt(plain, example)
    assert prompt_text(with_docs, "Q?", "ctx") == prompt_text(plain, "Q?", "ctx")
    messages = [{"role": "user", "content": "Q?"}]
    for kwargs in ({}, {"documents": None}, {"documents": []}):  # how serving may call it without passages
        assert with_docs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs) == (
            plain.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        )


@pytest.mark.parametrize(
    "base_template",
    [
        "\n{% for m in messages %}{{ m['content'] }}{% endfor %}",  # starts with a newline
        "  {% for m in messages %}{{ m['content'] }}\n{% endfor %}",  # indented tag, which lstrip_blocks strips
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}",
    ],
)
def test_the_preamble_leaves_any_template_as_it_was(base_template):
    from trainer.prompts import with_documents

    tokenizer = build_tiny_tokenizer()
    messages = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    tokenizer.chat_template = base_template
    before = tokenizer.apply_chat_template(messages, tokenize=False)
    tokenizer.chat_template = with_documents(base_template)
    assert tokenizer.apply_chat_template(messages, tokenize=False) == before
    assert with_documents(tokenizer.chat_template) == tokenizer.chat_template  # installed once


def test_documents_go_into_the_last_user_message_after_input(prompt_format):
    _, tokenizer = _tokenizers(prompt_format)
    block = "\n\nInput:\n[1] Pricing\nYou pay per second.\n\n[2] Regions\nMost AWS Regions."
    prompt = prompt_text(tokenizer, "What does it cost?", documents=DOCS)
    if prompt_format == "dolly":
        assert prompt.endswith(f"### Instruction:\nWhat does it cost?{block}\n\n### Response:\n")
    else:
        assert prompt.endswith(f"<|im_start|>user\nWhat does it cost?{block}<|im_end|>\n<|im_start|>assistant\n")
    # Served the same way: apply_chat_template(..., documents=...) on the messages.
    served = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What does it cost?"}], documents=DOCS, add_generation_prompt=True, tokenize=False
    )
    assert served == prompt
    # The context column keeps its own Input: first; the documents follow.
    assert f"Summarise.\n\nInput:\nA long text.{block}" in example_prompt(tokenizer, EXAMPLES[1], documents=DOCS)
    # In a conversation, only the last user message carries them.
    conversation = example_prompt(tokenizer, EXAMPLES[2], documents=DOCS)
    assert conversation.count("Input:") == 1 and f"And Z?{block}" in conversation and "Hi\n\nInput" not in conversation


def test_the_artifact_tokenizer_keeps_the_documents_template(tmp_path):
    from transformers import AutoTokenizer

    _, tokenizer = _tokenizers("chat_template")
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert prompt_text(reloaded, "Q?", documents=DOCS) == prompt_text(tokenizer, "Q?", documents=DOCS)


def test_labels_stay_on_the_answer_with_documents(prompt_format):
    _, tokenizer = _tokenizers(prompt_format)
    for example in EXAMPLES[:2]:
        item = encode_example(tokenizer, example, documents=DOCS)
        prompt_ids = tokenizer(example_prompt(tokenizer, example, documents=DOCS), add_special_tokens=False)[
            "input_ids"
        ]
        n = len(prompt_ids)
        assert item["input_ids"][:n] == prompt_ids  # the prompt as served, documents included
        assert item["labels"][:n] == [IGNORE_INDEX] * n  # no loss on the prompt, nor on the passages
        answer = tokenizer.decode(item["labels"][n:])
        end = "<|im_end|>" if prompt_format == "chat_template" else "\n\n### End<|im_end|>"
        assert answer == example.answer + end
        assert item["labels"][n:] == item["input_ids"][n:]


def test_labels_of_a_conversation_with_documents_cover_every_answer_only():
    _, tokenizer = _tokenizers("chat_template")
    item = encode_example(tokenizer, EXAMPLES[2], documents=DOCS)
    learned = tokenizer.decode([t for t in item["labels"] if t != IGNORE_INDEX])
    assert learned == "Hello<|im_end|>Z too.<|im_end|>"
    text = tokenizer.decode(item["input_ids"])
    assert text.count("[1] Pricing") == 1 and text.index("[1] Pricing") > text.index("Hello")


# > Hyperparameters


def test_retrieval_auto_turns_on_from_forty_training_rows_or_with_documents():
    config = TrainConfig.from_hyperparameters({})
    assert (config.retrieval, config.retrieval_k, config.retrieval_gold_fraction) == ("auto", 3, 0.8)
    assert config.retrieval_train_fraction == 0.25
    assert RETRIEVAL_MIN_ROWS == 40
    assert not config.use_retrieval(39) and config.use_retrieval(40) and config.use_retrieval(1, documents=True)
    assert TrainConfig.from_hyperparameters({"retrieval": "on"}).use_retrieval(2)
    assert not TrainConfig.from_hyperparameters({"retrieval": "off"}).use_retrieval(1000, documents=True)
    assert TrainConfig.from_hyperparameters({"retrieval": "true"}).retrieval == "on"  # json.dumps(True), decoded
    assert TrainConfig.from_hyperparameters({"retrieval": "False"}).retrieval == "off"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("retrieval", "maybe", r"'retrieval': 'maybe' is not one of auto, on, off"),
        ("retrieval_k", "0", r"'retrieval_k': 0 must be at least 1"),
        ("retrieval_k", "11", r"'retrieval_k': 11 must be at most 10"),
        ("retrieval_gold_fraction", "1.5", r"'retrieval_gold_fraction': must be in \[0, 1\]"),
        ("retrieval_gold_fraction", "-0.1", r"'retrieval_gold_fraction': -0.1 must be at least 0"),
        ("retrieval_train_fraction", "1.5", r"'retrieval_train_fraction': must be in \[0, 1\]"),
        ("retrieval_min_margin", "-0.1", r"'retrieval_min_margin': '-0.1' must be auto or a number >= 0"),
        ("retrieval_min_margin", "high", r"'retrieval_min_margin': 'high' must be auto or a number >= 0"),
        ("retrieval_min_margin", "nan", r"'retrieval_min_margin': 'nan' must be auto or a number >= 0"),
    ],
)
def test_bad_retrieval_hyperparameters_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_hyperparameters({key: value})


# > RAFT: the training examples' documents


TOPICS = ["billing", "regions", "notebooks", "endpoints", "training", "security", "storage", "pipelines"]


def _rows(n: int) -> list[Example]:
    """n question/answer rows in 8 topics: questions of a topic share words, so retrieval finds distractors."""
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        rows.append(
            Example(
                f"How do I configure {topic} option {i} for project {i * 7 % 13}?",
                f"Set {topic} option {i} in the console; it applies to {topic} resources of project {i * 7 % 13}.",
                source=f"rows.csv:row {i + 1}",
            )
        )
    return rows


def _raft(rows, dense=True, **kwargs):
    index = RetrievalIndex.build(passages_from_rows(rows), dense=dense)
    options = {"k": 3, "gold_fraction": 0.8, "seed": 42, **kwargs}
    return index, raft_documents(index, [r.question for r in rows], range(len(rows)), **options)


def test_raft_honours_the_gold_fraction_and_always_gives_distractors():
    rows = _rows(400)
    index, chosen = _raft(rows)
    with_gold = [c.gold for c in chosen]
    assert 0.75 <= sum(with_gold) / len(with_gold) <= 0.85
    for i, c in enumerate(chosen):
        ids = [p.id for p in c.passages]
        assert len(ids) == 3 and len(set(ids)) == 3
        assert (i in ids) == c.gold  # example i's own passage is passage i
        assert len([p for p in ids if p != i]) >= 2  # distractors, always
        if c.gold:  # the gold sits at the rank retrieval gave it, when that is within the top k
            ranked = [h.passage.id for h in index.search(rows[i].question, 3)]
            if i in ranked:
                assert ids.index(i) == ranked.index(i)
        else:  # the top k distractors, in retrieval's order
            ranked = [h.passage.id for h in index.search(rows[i].question, 8) if h.passage.id != i]
            assert ids == ranked[:3]
    assert c.documents() == [{"title": p.title, "text": p.text} for p in c.passages]


@pytest.mark.parametrize(("fraction", "expected"), [(0.0, False), (1.0, True)])
def test_raft_gold_fraction_bounds(fraction, expected):
    _, chosen = _raft(_rows(40), gold_fraction=fraction)
    assert all(c.gold is expected for c in chosen)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 1.0])
def test_raft_gives_passages_to_the_context_fraction_and_none_to_the_rest(fraction):
    rows = _rows(40)
    _, chosen = _raft(rows, context_fraction=fraction)
    with_passages = [i for i, c in enumerate(chosen) if c.passages]
    assert len(with_passages) == round(fraction * len(rows))
    for c in chosen:
        if not c.passages:  # closed book: nothing in the prompt, so not gold either
            assert c.documents() == [] and c.gold is False
        else:
            assert len(c.passages) == 3
    # The examples with passages get exactly what they would with every example given passages.
    _, all_with = _raft(rows)
    assert all(chosen[i] == all_with[i] for i in with_passages)
    assert _raft(rows, context_fraction=fraction)[1] == chosen  # seeded


def test_raft_is_reproducible_from_the_seed():
    rows = _rows(80)
    _, first = _raft(rows)
    _, again = _raft(rows)
    _, other = _raft(rows, seed=7)
    assert first == again
    assert [c.gold for c in first] != [c.gold for c in other]


def test_raft_fills_distractors_at_random_when_retrieval_finds_too_few():
    rows = [Example(f"{word} question", f"{word} answer") for word in ("alpha", "beta", "gamma", "delta", "omega")]
    _, chosen = _raft(rows, dense=False, gold_fraction=1.0)  # no query shares a word with another row
    for i, c in enumerate(chosen):
        assert c.passages[0].id == i  # retrieval ranks the gold first
        assert len(c.passages) == 3
    assert _raft(rows, dense=False, gold_fraction=1.0)[1] == chosen


def test_raft_puts_an_unretrieved_gold_at_a_seeded_position():
    # Passage 0 (the gold) shares no word with the question: BM25 does not rank it, so it goes at a random
    # place among the k, the same for the same seed.
    rows = [Example(f"Where is item {i}?", f"Item {i} is here.") for i in range(10)]
    rows += [Example("zebra stripes?", "Black and white."), Example("zebra food?", "Grass.")]
    index = RetrievalIndex.build(passages_from_rows(rows), dense=False)
    positions = set()
    for seed in range(30):
        [c] = raft_documents(index, ["zebra?"], [0], k=3, gold_fraction=1.0, seed=seed)
        ids = [p.id for p in c.passages]
        assert sorted(ids) == [0, 10, 11] and [i for i in ids if i != 0] == [10, 11]  # distractors in rank order
        positions.add(ids.index(0))
        assert raft_documents(index, ["zebra?"], [0], k=3, gold_fraction=1.0, seed=seed) == [c]
    assert positions == {0, 1, 2}


def test_row_sources_follow_data_py_numbering():
    assert retrieval.row_source("faq.csv:row 12") == "faq.csv#12"
    assert retrieval.row_source("data[train]:row 3") == "data[train]#3"
    assert retrieval.row_source("odd") == "odd"
