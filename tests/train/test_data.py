import json

import pytest
from fixtures import faq_csv
from trainer.data import Columns, DataReport, load_channel, split
from trainer.errors import DataError

from .conftest import csv_text, faq_rows


def test_reads_the_faq_file_as_shipped(tmp_path):
    """No header row, UTF-8 BOM, CRLF, newlines inside fields, NBSPs, one question asked twice: the generated FAQ
    (tests/fixtures/faq_csv.py) has every quirk of the real file, whose bytes the tests never need."""
    path = faq_csv.write_faq_csv(tmp_path)
    data = path.read_bytes()
    assert data.startswith(b"\xef\xbb\xbf") and b"\n" not in data.replace(b"\r\n", b"")  # BOM; CRLF only
    assert faq_rows(1)[0][0].startswith("What is")  # no header row
    assert sum(q.endswith("\r\n") for q, _ in faq_rows()) == faq_csv.QUESTIONS_WITH_LINE_BREAK  # inside the quotes
    examples, report = load_channel(tmp_path)
    assert report.rows_read == faq_csv.ROWS and report.rows_kept == faq_csv.ROWS
    assert examples[0].question == faq_csv.FIRST_QUESTION
    assert not examples[0].question.startswith("\ufeff")
    assert all("\u00a0" not in e.answer and "\r" not in e.answer for e in examples)
    assert all("\u00a0" not in e.question for e in examples)
    assert all(e.question == e.question.strip() and "\n" not in e.question for e in examples)
    assert sum("\n" in e.answer for e in examples) == faq_csv.ANSWERS_WITH_LINE_BREAK  # paragraphs kept, as LF
    assert report.non_breaking_spaces_replaced == faq_csv.NBSP_COUNT
    assert report.questions_with_several_answers == [faq_csv.DUPLICATED_QUESTION]


def test_header_jsonl_and_parquet_with_configured_columns(tmp_path):
    import pandas as pd

    (tmp_path / "a.csv").write_text(csv_text([["q1", "a1"]], header=["instruction", "response"]))
    (tmp_path / "b.jsonl").write_text(json.dumps({"instruction": "q2", "response": "a2", "context": "c"}) + "\n\n")
    pd.DataFrame({"instruction": ["q3"], "response": ["a3"]}).to_parquet(tmp_path / "c.parquet")
    examples, _ = load_channel(tmp_path, Columns("instruction", "response"))
    assert [(e.question, e.answer, e.context) for e in examples] == [
        ("q1", "a1", ""),
        ("q2", "a2", "c"),
        ("q3", "a3", ""),
    ]


def test_empty_and_duplicate_rows_are_counted_not_silently_dropped(tmp_path):
    rows = [["q1", "a1"], ["q1", "a1"], ["", "a2"], ["q3", "  "], ["q4", "a\u00a0b   c"]]
    (tmp_path / "d.csv").write_text(csv_text(rows, header=["question", "answer"]))
    examples, report = load_channel(tmp_path)
    assert [(e.question, e.answer) for e in examples] == [("q1", "a1"), ("q4", "a b c")]
    assert report.duplicate_rows_dropped == ["d.csv:row 3"]
    assert report.empty_rows == ["d.csv:row 4", "d.csv:row 5"]
    assert "2 empty row(s) dropped, 1 exact duplicate(s) dropped" in report.summary()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("e.csv", "", r"e\.csv: the file is empty"),
        ("m.csv", 'question,answer\n"q1","a1"\n"q2","a2","extra"\n', r"m\.csv: malformed CSV .*Expected 2 fields"),
        ("u.csv", "query,reply\nq,a\n", None),
        ("j.jsonl", '{"question": "q"}\nnot json\n', r"j\.jsonl: line 2 is not valid JSON"),
        ("one.csv", "just one column\n", r"expected at least 2 columns"),
    ],
)
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
    held_out = round(0.15 * (faq_csv.ROWS - 1))  # questions: one of them is asked twice
    assert len(validation) in (held_out, held_out + 1)
    assert not {e.question for e in train} & {e.question for e in validation}
    assert split(examples, 0.0, seed=7) == (examples, [])


def test_report_counts_whitespace_fixes():
    report = DataReport()
    assert report.summary().startswith("0 rows read")
