"""Training data: read a channel, clean it, report what was fixed (docs/training-data.md has the formats).

A channel holds CSV, JSON Lines, JSON arrays or Parquet files of question/answer records (Alpaca's
instruction/input/output records among them), chat conversations (`{"messages": [{"role", "content"}, ...]}`),
or a Hugging Face dataset saved with `save_to_disk`. A malformed record is an error naming the file, the row and
the field. Pure functions over files and lists; no torch. Nothing is dropped silently: every empty row, duplicate
and repaired field is counted in the DataReport, which lands in the log and in output/data/.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import DataError

SUPPORTED_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
QUESTION_ALIASES = ("question", "instruction", "prompt")
ANSWER_ALIASES = ("answer", "response", "completion", "output")
CONTEXT_ALIASES = ("context", "input")
MESSAGES_COLUMN = "messages"
ROLES = ("system", "user", "assistant")
# What `save_to_disk` writes at the top of a Dataset's / a DatasetDict's directory.
DATASET_MARKERS = ("state.json", "dataset_dict.json")

_SPACES = re.compile(r"[ \t\f\v]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_ANY_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Example:
    """One training example. A chat conversation keeps its turns in `messages` ((role, content) pairs, ending
    with an assistant turn); its question and answer are then its last user and assistant turns."""

    question: str
    answer: str
    context: str = ""
    source: str = ""  # file:row, for error messages and reports
    messages: tuple[tuple[str, str], ...] = ()


@dataclass
class DataReport:
    files: list[str] = field(default_factory=list)
    rows_read: int = 0
    rows_kept: int = 0
    empty_rows: list[str] = field(default_factory=list)
    duplicate_rows_dropped: list[str] = field(default_factory=list)
    questions_with_several_answers: list[str] = field(default_factory=list)
    fields_whitespace_cleaned: int = 0
    non_breaking_spaces_replaced: int = 0

    def summary(self) -> str:
        return (
            f"{self.rows_read} rows read from {len(self.files)} file(s), {self.rows_kept} kept; "
            f"{len(self.empty_rows)} empty row(s) dropped, {len(self.duplicate_rows_dropped)} exact duplicate(s) "
            f"dropped, {len(self.questions_with_several_answers)} question(s) with several answers kept; "
            f"{self.fields_whitespace_cleaned} field(s) whitespace-cleaned, "
            f"{self.non_breaking_spaces_replaced} non-breaking space(s) replaced"
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Columns:
    question: str = "question"
    answer: str = "answer"
    context: str = "context"


def load_channel(
    directory: Path,
    columns: Columns = Columns(),
    csv_header: str = "auto",
    report: DataReport | None = None,
    split_name: str = "train",
) -> tuple[list[Example], DataReport]:
    """Read every supported file in a channel directory (sorted, recursive), cleaned and de-duplicated; or the
    dataset saved there with `save_to_disk` (of a DatasetDict, the split `split_name`)."""
    report = report if report is not None else DataReport()
    if any((directory / marker).is_file() for marker in DATASET_MARKERS):
        label, records = _read_saved_dataset(directory, split_name)
        report.files.append(label)
        rows = _records_to_examples(Path(label), records, columns)
        if not rows:
            raise DataError(f"{directory}: the dataset ({label}) holds no rows")
        return clean(rows, report), report
    files = sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        present = sorted(p.name for p in directory.rglob("*") if p.is_file())
        raise DataError(
            f"no data file in {directory}: expected {', '.join(SUPPORTED_SUFFIXES)} files"
            + (f", found only {', '.join(present[:5])}" if present else " (the directory is empty)")
        )
    raw: list[Example] = []
    for path in files:
        report.files.append(path.name)
        rows = _read_file(path, columns, csv_header)
        if not rows:
            raise DataError(f"{path}: the file holds no rows")
        raw.extend(rows)
    return clean(raw, report), report


def clean(rows: list[Example], report: DataReport) -> list[Example]:
    kept: list[Example] = []
    seen_pairs: set[tuple[str, str, str]] = set()
    answers_by_question: dict[str, str] = {}
    for row in rows:
        report.rows_read += 1
        question = _clean_field(row.question, report, single_line=True)
        answer = _clean_field(row.answer, report)
        context = _clean_field(row.context, report)
        messages = tuple((role, _clean_field(content, report)) for role, content in row.messages)
        if not question or not answer or any(not content and role != "system" for role, content in messages):
            report.empty_rows.append(row.source)
            continue
        key = (question, answer, context, messages)
        if key in seen_pairs:
            report.duplicate_rows_dropped.append(row.source)
            continue
        seen_pairs.add(key)
        if question in answers_by_question and question not in report.questions_with_several_answers:
            report.questions_with_several_answers.append(question)
        answers_by_question.setdefault(question, answer)
        kept.append(Example(question, answer, context, row.source, messages))
    report.rows_kept = len(kept)
    if not kept:
        raise DataError(f"no usable rows: all {report.rows_read} row(s) have an empty question or answer")
    return kept


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded held-out split by question, so a repeated question never sits on both sides."""
    questions = sorted({e.question for e in examples})
    if fraction <= 0 or len(questions) < 2:
        return examples, []
    random.Random(seed).shuffle(questions)
    held_out = set(questions[: max(1, round(fraction * len(questions)))])
    return [e for e in examples if e.question not in held_out], [e for e in examples if e.question in held_out]


def _clean_field(value: str, report: DataReport, single_line: bool = False) -> str:
    text = value or ""
    if "\u00a0" in text:
        report.non_breaking_spaces_replaced += text.count("\u00a0")
        text = text.replace("\u00a0", " ")
    if single_line:
        cleaned = _ANY_WHITESPACE.sub(" ", text).strip()
    else:
        lines = [_SPACES.sub(" ", line).strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
        cleaned = _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()
    if cleaned != text:
        report.fields_whitespace_cleaned += 1
    return cleaned


def _read_file(path: Path, columns: Columns, csv_header: str) -> list[Example]:
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if suffix == ".csv":
        return _read_csv(path, columns, csv_header)
    if suffix in (".jsonl", ".json"):
        return _records_to_examples(path, _read_json_records(path), columns)
    return _records_to_examples(path, _read_parquet(path), columns)


def _read_csv(path: Path, columns: Columns, csv_header: str) -> list[Example]:
    import pandas as pd  # deferred: pandas is heavy and only needed for CSV/Parquet

    try:
        # utf-8-sig strips a byte-order mark; the C parser handles CRLF and newlines inside quoted fields.
        frame = pd.read_csv(path, header=None, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.ParserError as e:
        raise DataError(f"{path}: malformed CSV ({e})") from e
    except pd.errors.EmptyDataError as e:
        raise DataError(f"{path}: the file is empty") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from e
    first_row = [str(v).strip().lower() for v in frame.iloc[0]]
    has_header = {"true": True, "false": False}.get(
        csv_header, _names_a_column(first_row, columns.question, QUESTION_ALIASES)
    )
    if has_header:
        frame.columns = [str(v).strip() for v in frame.iloc[0]]
        frame = frame.iloc[1:]
        records = frame.to_dict("records")
        return _records_to_examples(path, records, columns, first_row_number=2)
    if frame.shape[1] < 2:
        raise DataError(f"{path}: expected at least 2 columns (question, answer), found {frame.shape[1]}")
    if columns != Columns():
        raise DataError(
            f"{path}: has no header row, so columns {columns.question!r}/{columns.answer!r} cannot be found; "
            "add a header row or use the default column names (question, answer[, context] by position)"
        )
    named = frame.rename(columns={0: "question", 1: "answer", 2: "context"})
    return _records_to_examples(path, named.to_dict("records"), Columns(), first_row_number=1)


def _read_json_records(path: Path) -> list[dict]:
    """JSON Lines (one object per line; row N is line N), or one JSON array of objects (row N is its Nth)."""
    records = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from e
    if text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except ValueError as e:
            raise DataError(f"{path}: not a valid JSON array ({e})") from e
        for number, record in enumerate(array, start=1):
            if not isinstance(record, dict):
                raise DataError(f"{path}: row {number} is not a JSON object (got {type(record).__name__})")
        return array
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}: line {number} is not valid JSON ({e.args[0]})") from e
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number} is not a JSON object")
        records.append(record)
    return records


def _read_saved_dataset(directory: Path, split_name: str) -> tuple[str, list[dict]]:
    """The rows of a Hugging Face dataset saved with `save_to_disk`: a Dataset, or a DatasetDict's split
    `split_name` (a DatasetDict of one split: that split). Returns a label for messages, `dir[split]`."""
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(directory))
    except Exception as e:  # datasets raises several unrelated types for a damaged directory
        raise DataError(f"{directory}: not a readable dataset saved with save_to_disk ({e})") from e
    label = directory.name
    if isinstance(loaded, DatasetDict):
        names = list(loaded)
        if split_name not in loaded and len(names) != 1:
            raise DataError(
                f"{directory}: the saved DatasetDict has no {split_name!r} split (it has {', '.join(map(repr, names))})"
            )
        chosen = split_name if split_name in loaded else names[0]
        loaded, label = loaded[chosen], f"{directory.name}[{chosen}]"
    if not isinstance(loaded, Dataset):
        raise DataError(f"{directory}: expected a Dataset or DatasetDict, got {type(loaded).__name__}")
    return label, loaded.to_list()


def _read_parquet(path: Path) -> list[dict]:
    import pandas as pd

    try:
        return pd.read_parquet(path).to_dict("records")
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e


def _records_to_examples(path: Path, records: list[dict], columns: Columns, first_row_number: int = 1) -> list[Example]:
    if not records:
        return []
    names = list(records[0].keys())
    if MESSAGES_COLUMN in names and not _has_column(names, columns.question, QUESTION_ALIASES):
        return [
            _chat_example(record.get(MESSAGES_COLUMN), f"{path.name}:row {first_row_number + offset}")
            for offset, record in enumerate(records)
        ]
    question = _find_column(path, names, columns.question, QUESTION_ALIASES, "question_column")
    answer = _find_column(path, names, columns.answer, ANSWER_ALIASES, "answer_column")
    context = _find_column(path, names, columns.context, CONTEXT_ALIASES, None)
    examples = []
    for offset, record in enumerate(records):
        source = f"{path.name}:row {first_row_number + offset}"
        for column in (question, answer):
            if column not in record:  # a JSON record without the field (an empty value is a different thing)
                raise DataError(f"{source}: no field {column!r} (the file's first row has it)")
        examples.append(
            Example(
                question=_as_text(record.get(question), source, question),
                answer=_as_text(record.get(answer), source, answer),
                context=_as_text(record.get(context), source, context) if context else "",
                source=source,
            )
        )
    return examples


def _chat_example(messages, source: str) -> Example:
    """A conversation: an optional system turn, then user and assistant turns in turn, ending with an assistant
    turn. Training learns every assistant turn; the question and answer are the last user and assistant turns."""
    if hasattr(messages, "tolist"):  # Parquet hands lists over as numpy arrays
        messages = messages.tolist()
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{source}: field 'messages' must be a non-empty list of {{role, content}} objects")
    turns = []
    for i, message in enumerate(messages):
        where = f"{source}: field 'messages[{i}]'"
        if not isinstance(message, dict):
            raise DataError(f"{where} is {type(message).__name__}, expected an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}.role is {role!r}, expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}.content is {type(content).__name__}, expected text")
        previous = turns[-1][0] if turns else None
        expected = {None: ("system", "user"), "system": ("user",), "user": ("assistant",), "assistant": ("user",)}[
            previous
        ]
        if role not in expected:
            raise DataError(
                f"{where}.role is {role!r} where {' or '.join(map(repr, expected))} belongs: a conversation is an "
                "optional system turn, then user and assistant turns in turn"
            )
        turns.append((role, content))
    if turns[-1][0] != "assistant":
        raise DataError(
            f"{source}: field 'messages' ends with a {turns[-1][0]} turn; the last turn must be the assistant's"
        )
    question = next(content for role, content in reversed(turns) if role == "user")
    return Example(question=question, answer=turns[-1][1], source=source, messages=tuple(turns))


def _has_column(names: list, configured: str, aliases: tuple[str, ...]) -> bool:
    lower = {str(n).lower() for n in names}
    return any(candidate.lower() in lower for candidate in (configured, *aliases))


def _names_a_column(first_row: list[str], configured: str, aliases: tuple[str, ...]) -> bool:
    return configured.lower() in first_row or any(a in first_row for a in aliases)


def _find_column(path: Path, names: list[str], configured: str, aliases: tuple[str, ...], hyperparameter: str | None):
    by_lower = {str(n).lower(): n for n in names}
    for candidate in (configured, *aliases):
        if candidate.lower() in by_lower:
            return by_lower[candidate.lower()]
    if hyperparameter is None:
        return None
    raise DataError(
        f"{path}: unknown column {configured!r}; the file has columns {', '.join(map(repr, names))}. "
        f"Set the hyperparameter '{hyperparameter}' to the right one."
    )


def _as_text(value, source: str, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from Parquet/pandas means missing
        return ""
    if isinstance(value, (dict, list)):
        raise DataError(f"{source}: column {column!r} holds {type(value).__name__}, expected text")
    return str(value)
