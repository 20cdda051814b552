import json

import pytest
from trainer.data import Columns, DataReport, load_channel, split
from trainer.errors import DataError

from .conftest import FAQ_CSV, csv_text, faq_rows


def test_reads_the_faq_file_as_shipped(tmp_path):
    """No header row, UTF-8 BOM, CRLF, newlines inside fields, NBSPs, one question asked twice."""
    (tmp_path / FAQ_CSV.name).write_bytes(FAQ_CSV.read_bytes())
    examples, report = load_channel(tmp_path)
    assert report.rows_read == 154 and report.rows_kept == 154
    assert examples[0].question == "What is Amazon SageMaker?"
    assert not examples[0].question.startswith("\ufeff")
    assert all("\u00a0" not in e.answer and "\r" not in e.answer for e in examples)
    assert all(e.question == e.question.strip() and "\n" not in e.question for e in examples)
    assert report.non_breaking_spaces_replaced == 73
    assert report.questions_with_several_answers == ["What is Amazon SageMaker Canvas?"]


def test_header_jsonl_and_parquet_with_configured_columns(tmp_path):
    import pandas as pd

    (tmp_path / "a.csv").write_text(csv_text([["q1", "a1"]], header=["instruction", "response"]))
    (tmp_path / "b.jsonl").write_text(json.dumps({"instruction": "q2", "response": "a2", "context": "c"}) + "\n\n")
    pd.DataFrame({"instruction": ["q3"], "response": ["a3"]}).to_parquet(tmp_path / "c.parquet")
    examples, _ = load_channel(tmp_path, Columns("instruction", "response"))
    assert [(e.question, e.answer, e.context) for e in examples] == [("q1", "a1", ""), ("q2", "a2", "c"),
                                                                     ("q3", "a3", "")]


def test_empty_and_duplicate_rows_are_counted_not_silently_dropped(tmp_path):
    rows = [["q1", "a1"], ["q1", "a1"], ["", "a2"], ["q3", "  "], ["q4", "a\u00a0b   c"]]
    (tmp_path / "d.csv").write_text(csv_text(rows, header=["question", "answer"]))
    examples, report = load_channel(tmp_path)
    assert [(e.question, e.answer) for e in examples] == [("q1", "a1"), ("q4", "a b c")]
    assert report.duplicate_rows_dropped == ["d.csv:row 3"]
    assert report.empty_rows == ["d.csv:row 4", "d.csv:row 5"]
    assert "2 empty row(s) dropped, 1 exact duplicate(s) dropped" in report.summary()


@pytest.mark.parametrize(("name", "content", "message"), [
    ("e.csv", "", r"e\.csv: the file is empty"),
    ("m.csv", 'question,answer\n"q1","a1"\n"q2","a2","extra"\n', r"m\.csv: malformed CSV .*Expected 2 fields"),
    ("u.csv", "query,reply\nq,a\n", None),
    ("j.jsonl", '{"question": "q"}\nnot json\n', r"j\.jsonl: line 2 is not valid JSON"),
    ("one.csv", "just one column\n", r"expected at least 2 columns"),
])
def test_bad_files_get_a_clear_error(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    if message is None:  # a header row whose names don't match: the unknown-column error
        with pytest.raises(DataError, match=r"unknown column 'question'.*'query', 'reply'.*question_column"):
            load_channel(tmp_path, csv_header="true")
        return
    with pytest.raises(DataError, match=message):
        load_channel(tmp_path)


def test_unknown_column_in_jsonl_names_the_hyperparameter(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"q": "a", "text": "b"}) + "\n")
    with pytest.raises(DataError, match=r"unknown column '(answer|question)'"):
        load_channel(tmp_path)


def test_no_data_file_lists_what_is_there(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"no data file .* found only notes\.txt"):
        load_channel(tmp_path)


def test_split_is_seeded_and_keeps_a_question_on_one_side(tmp_path):
    (tmp_path / "faq.csv").write_text(csv_text(faq_rows()))
    examples, _ = load_channel(tmp_path)
    train, validation = split(examples, 0.15, seed=7)
    assert (train, validation) == split(examples, 0.15, seed=7)
    assert len(validation) in (23, 24)
    assert not {e.question for e in train} & {e.question for e in validation}
    assert split(examples, 0.0, seed=7) == (examples, [])


def test_report_counts_whitespace_fixes():
    report = DataReport()
    assert report.summary().startswith("0 rows read")
