"""Retrieval: an index over the training rows and the `documents` channel, shipped in the artifact: BM25 (lexical)
and static word embeddings (semantic), fused.

A training row becomes one passage (title = its question, text = its answer); a documents file is split into
passages at Markdown headings and paragraphs (`passages_from_documents`). `RetrievalIndex` keeps two `bm25s`
indexes, over the titles and over the texts, and (unless built with `dense=False`) the passages' title embeddings
by WordLlama, and fuses their scores (`search`). The serving image reads the same format with its own code
(serve/retrieval.py), so the layout and the scoring below are a contract between the two:

    model/retrieval/
        passages.jsonl            one {"id", "title", "text", "source"} per line, ids 0..N-1 in order
        bm25_title/, bm25_text/   bm25s.BM25() indexes (default parameters) over titles and texts, in id order
        dense_title.npy           (optional) float32 [N, dim]: each title's WordLlama embedding, L2-normalised
        retrieval.json            format_version, library, bm25s_version, stopwords, stemmer, token_pattern,
                                  field_weights, k, passages; and, with embeddings, dense: {library,
                                  library_version, config, dim, field_weights}; and, with a gate, gate:
                                  {min_margin, calibration}

Scoring: the query's tokens (bm25s.tokenize with the stopwords, PyStemmer stemmer and token pattern above); a
query without any (empty, or stopwords only) retrieves nothing. Per BM25 field, the scores divided by their
maximum (0 when it is 0); per dense field, the cosine of the query's embedding with each passage's, scaled to
[0, 1] over the passages (min to max; 0 when all are equal); a passage's score is the weighted sum of them all;
the top k by score, ties to the lower id; passages scoring 0 are never returned. The gate: when the best score
leads the second best (0 without one) by less than `gate.min_margin`, the query gets no passages at all.

Why a gate: a question whose answer is not in the index still gets its k nearest passages, and a model that
trained to use its passages answers from them, worse than from memory (the benchmark measured it on held-out
questions). Such queries have no clear winner: the lead of the best passage over the next tells them from
reworded questions whose row is indexed, far better than the best score alone does. `calibrate_gate` sets it from
the training rows alone: each row's question searched with its own passage left out is exactly a question whose
answer is not indexed, and the gate is set at a high quantile of those leads (GATE_QUANTILE). Adaptive retrieval
of this kind: Mallen et al. 2023 (arXiv:2212.10511), retrieving only where it is likely to help.

Why embeddings as well: a reworded question often shares no content word with the row it asks about (uptime /
availability, cost / charged), which no lexical index can match. WordLlama's embeddings ship inside its wheel
(16 MB; no model hub at run time) and embed a query in well under a millisecond. Titles only: a row's title is its
question, the text a user's question resembles; the mean of a long answer's word vectors blurs its meaning.

`raft_documents` builds the training examples' documents as RAFT does (arXiv:2403.10131): the example's own
passage (gold) among retrieved distractors in most examples, distractors only in the others; and, for a share of
the examples, none at all (closed-book examples).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LIBRARY = "bm25s"
STOPWORDS = "en"
STEMMER = "english"  # PyStemmer's Snowball stemmer
TOKEN_PATTERN = r"(?u)\b\w+\b"  # single-character tokens count too ("S3", "a 2-node cluster")
FIELD_WEIGHTS = {"title": 1.0, "text": 1.0}
DENSE_LIBRARY = "wordllama"
DENSE_CONFIG = "l2_supercat"  # the WordLlama model its wheel ships (MIT), at its full 256 dimensions
DENSE_DIM = 256
DENSE_FIELD_WEIGHTS = {"title": 1.0}  # titles only (the module's docstring says why)
INDEX_FILE = "retrieval.json"
PASSAGES_FILE = "passages.jsonl"
RETRIEVAL_DIR = "retrieval"  # under the model directory
DEFAULT_K = 3
RAFT_CANDIDATES = 5  # retrieved beyond k for each training example, to choose distractors from
GATE_QUANTILE = 0.75  # `auto` gate: passages only above this quantile of the rows' leave-one-out leads
GATE_MIN_ROWS = 40  # fewer training rows place that quantile too loosely: no `auto` gate
GATE_MAX_QUERIES = 2000  # leave-one-out queries for the calibration at most (a seeded sample of larger sets)

DOCUMENT_SUFFIXES = (".txt", ".md", ".markdown")
MIN_PASSAGE_WORDS = 40  # a passage shorter than this is merged with its neighbour in the same section, where it fits
MAX_PASSAGE_WORDS = 150  # a longer paragraph is split, at line ends where it has them, else between words

_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


@dataclass(frozen=True)
class Passage:
    id: int  # its row in the index, 0..N-1
    title: str
    text: str
    source: str  # "<file name>#<row>" for a training row, "<path in the channel>#p<n>" for a document's passage

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ScoredPassage:
    passage: Passage
    score: float  # the fused score: 0 < score <= the sum of the field weights (BM25 and dense)

    def document(self) -> dict[str, str]:
        """The passage as the chat template's `documents` take it."""
        return {"title": self.passage.title, "text": self.passage.text}


class DenseIndex:
    """The passages' WordLlama embeddings per field (DENSE_FIELD_WEIGHTS) and the model that embeds queries."""

    def __init__(self, model, embeddings: dict):
        self.model = model  # wordllama's WordLlamaInference
        self.embeddings = embeddings  # field -> float32 [N, dim], L2-normalised rows

    @classmethod
    def build(cls, passages: Sequence[Passage]) -> DenseIndex:
        model = load_word_embeddings()
        return cls(model, {f: model.embed([getattr(p, f) for p in passages], norm=True) for f in DENSE_FIELD_WEIGHTS})

    def settings(self) -> dict:
        from importlib.metadata import version

        return {
            "library": DENSE_LIBRARY,
            "library_version": version(DENSE_LIBRARY),
            "config": DENSE_CONFIG,
            "dim": DENSE_DIM,
            "field_weights": dict(DENSE_FIELD_WEIGHTS),
        }

    def save(self, directory: Path) -> dict:
        import numpy as np

        for field, vectors in self.embeddings.items():
            np.save(directory / f"dense_{field}.npy", np.asarray(vectors, dtype=np.float32), allow_pickle=False)
        return self.settings()

    @classmethod
    def load(cls, directory: Path, settings: dict, count: int) -> DenseIndex:
        import numpy as np

        expected = {
            "library": DENSE_LIBRARY,
            "config": DENSE_CONFIG,
            "dim": DENSE_DIM,
            "field_weights": DENSE_FIELD_WEIGHTS,
        }
        different = [key for key, value in expected.items() if settings.get(key) != value]
        if different:
            raise DataError(
                f"{directory / INDEX_FILE}: embeddings this trainer does not read ({', '.join(different)} differ: "
                f"{ {key: settings.get(key) for key in different} })"
            )
        embeddings = {}
        for field in DENSE_FIELD_WEIGHTS:
            path = directory / f"dense_{field}.npy"
            try:
                vectors = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: not readable embeddings ({e})") from e
            if vectors.shape != (count, DENSE_DIM):
                raise DataError(f"{path}: shape {vectors.shape}, expected ({count}, {DENSE_DIM})")
            embeddings[field] = vectors
        return cls(load_word_embeddings(), embeddings)

    def scores(self, query: str, exclude: int | None = None):
        """Per passage, the weighted sum over fields of the query's cosine with it, scaled to [0, 1] (min to max).
        `exclude`: as if that passage were not indexed (scaled over the others; its own score 0)."""
        import numpy as np

        query_vector = self.model.embed([query], norm=True)[0]
        total = None
        for field, weight in DENSE_FIELD_WEIGHTS.items():
            cosines = np.asarray(self.embeddings[field] @ query_vector, dtype=np.float64)
            others = cosines if exclude is None else np.delete(cosines, exclude)
            low, high = (float(others.min()), float(others.max())) if others.size else (0.0, 0.0)
            spread = high - low
            scaled = (cosines - low) / spread if spread > 0 else np.zeros_like(cosines)
            if exclude is not None:
                scaled[exclude] = 0.0
            total = weight * scaled if total is None else total + weight * scaled
        return total


@functools.cache  # read-only once loaded; every index of the job (and of a test run) shares it
def load_word_embeddings():
    """WordLlama's model from its own wheel, never from the network. Its loader looks for the tokenizer's file in
    the package's `tokenizer/` folder while the wheel ships it in `tokenizers/`; its cache layout (`tokenizers/`,
    `weights/`) is the package's, so the package folder as the cache finds both files."""
    try:
        import wordllama
    except ImportError as e:
        raise DataError(
            f"retrieval_dense needs the {DENSE_LIBRARY} package (in the training image's requirements): {e}"
        ) from e
    return wordllama.WordLlama.load(
        config=DENSE_CONFIG, dim=DENSE_DIM, cache_dir=Path(wordllama.__file__).parent, disable_download=True
    )


class RetrievalIndex:
    """Passages, a BM25 index per field (FIELD_WEIGHTS) and optionally their embeddings (DenseIndex), searched
    with the fused score above."""

    def __init__(
        self,
        passages: Sequence[Passage],
        indexes: dict,
        k: int = DEFAULT_K,
        dense: DenseIndex | None = None,
        gate: Gate | None = None,
    ):
        self.passages = list(passages)
        self.indexes = indexes  # field -> bm25s.BM25
        self.k = k
        self.dense = dense
        self.gate = gate or Gate()

    def __len__(self) -> int:
        return len(self.passages)

    @classmethod
    def build(cls, passages: Iterable[Passage], k: int = DEFAULT_K, dense: bool = True) -> RetrievalIndex:
        """Index `passages` in the order given; their ids become their positions (0..N-1). `dense`: with the
        titles' embeddings as well."""
        import bm25s

        passages = [dataclasses.replace(p, id=i) for i, p in enumerate(passages)]
        if not passages:
            raise DataError("nothing to index for retrieval: no training rows and no documents")
        indexes = {}
        for field in FIELD_WEIGHTS:
            corpus = _tokenize([getattr(p, field) for p in passages], return_ids=True)
            index = bm25s.BM25()
            index.index(corpus, show_progress=False)
            indexes[field] = index
        return cls(passages, indexes, k, DenseIndex.build(passages) if dense else None)

    def save(self, directory: Path) -> Path:
        """Write the contract's layout into `directory` (created; files of an earlier index there are replaced)."""
        import bm25s

        directory.mkdir(parents=True, exist_ok=True)
        with (directory / PASSAGES_FILE).open("w", encoding="utf-8") as f:
            for passage in self.passages:
                f.write(json.dumps(passage.to_dict(), ensure_ascii=False) + "\n")
        for field, index in self.indexes.items():
            index.save(str(directory / f"bm25_{field}"), show_progress=False)
        settings = {
            "format_version": FORMAT_VERSION,
            "library": LIBRARY,
            "bm25s_version": bm25s.__version__,
            "stopwords": STOPWORDS,
            "stemmer": STEMMER,
            "token_pattern": TOKEN_PATTERN,
            "field_weights": dict(FIELD_WEIGHTS),
            "k": self.k,
            "passages": len(self.passages),
        }
        if self.dense is not None:
            settings["dense"] = self.dense.save(directory)
        if self.gate.min_margin > 0:
            settings["gate"] = self.gate.to_dict()
        (directory / INDEX_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: Path) -> RetrievalIndex:
        """The index `save` wrote; DataError naming what is missing or not in this format."""
        import bm25s

        directory = Path(directory)
        settings_path = directory / INDEX_FILE
        try:
            settings = json.loads(settings_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{directory}: no retrieval index ({INDEX_FILE} is missing)") from None
        except ValueError as e:
            raise DataError(f"{settings_path}: not valid JSON ({e})") from e
        expected = {
            "format_version": FORMAT_VERSION,
            "library": LIBRARY,
            "stopwords": STOPWORDS,
            "stemmer": STEMMER,
            "token_pattern": TOKEN_PATTERN,
            "field_weights": FIELD_WEIGHTS,
        }
        different = [key for key, value in expected.items() if settings.get(key) != value]
        if different:
            raise DataError(
                f"{settings_path}: an index this trainer does not read ({', '.join(different)} differ: "
                f"{ {key: settings.get(key) for key in different} })"
            )
        passages = []
        with (directory / PASSAGES_FILE).open(encoding="utf-8") as f:
            for number, line in enumerate(f):
                passage = Passage(**json.loads(line))
                if passage.id != number:
                    raise DataError(f"{directory / PASSAGES_FILE}: line {number + 1} has id {passage.id}")
                passages.append(passage)
        if len(passages) != settings.get("passages"):
            raise DataError(
                f"{directory}: {INDEX_FILE} counts {settings.get('passages')} passages, {PASSAGES_FILE} has "
                f"{len(passages)}"
            )
        indexes = {
            field: bm25s.BM25.load(str(directory / f"bm25_{field}"), show_progress=False) for field in FIELD_WEIGHTS
        }
        dense = settings.get("dense")
        dense = DenseIndex.load(directory, dense, len(passages)) if isinstance(dense, dict) else None
        gate = Gate.from_settings(settings.get("gate"), settings_path)
        return cls(passages, indexes, int(settings.get("k", DEFAULT_K)), dense, gate)

    def scores(self, query: str, exclude: int | None = None):
        """Every passage's fused score for `query` (None when the query has no tokens); `exclude`: as if that
        passage were not indexed (the others scaled without it, its own score 0)."""
        import numpy as np

        tokens = _tokenize([query], return_ids=False)[0]
        if not tokens:
            return None
        total = np.zeros(len(self.passages), dtype=np.float64)
        for field, weight in FIELD_WEIGHTS.items():
            scores = np.asarray(self.indexes[field].get_scores(tokens), dtype=np.float64)
            if exclude is not None:
                scores[exclude] = 0.0
            top = float(scores.max(initial=0.0))
            if top > 0:
                total += weight * (scores / top)
        if self.dense is not None:
            total += self.dense.scores(query, exclude=exclude)
        return total

    def search(self, query: str, k: int, gated: bool = True) -> list[ScoredPassage]:
        """The top `k` passages for `query`, best first; fewer when fewer score above 0; none when `gated` and
        the best does not lead the next by the gate's margin."""
        import numpy as np

        total = self.scores(query) if k > 0 else None
        if total is None:
            return []
        order = np.argsort(-total, kind="stable")  # score descending; ties keep id order
        if gated and _margin(total, order) < self.gate.min_margin:
            return []
        return [ScoredPassage(self.passages[i], float(total[i])) for i in order[:k] if total[i] > 0]

    def margin(self, query: str, exclude: int | None = None) -> float | None:
        """How far the best passage's score leads the second best's (0 where it has none); None for a query
        without tokens."""
        import numpy as np

        total = self.scores(query, exclude=exclude)
        return None if total is None else _margin(total, np.argsort(-total, kind="stable"))

    def leave_one_out_margins(self, ids: Iterable[int]) -> list[float]:
        """For each passage id, the margin of its title searched as if it were not indexed: what a question whose
        answer is missing gets. (BM25's term statistics still count it: a small bias for one passage of many.)"""
        margins = [self.margin(self.passages[i].title, exclude=i) for i in ids]
        return [m for m in margins if m is not None]

    def documents_for(self, question: str, k: int | None = None) -> list[dict]:
        """What evaluation takes as a question's documents: the passages retrieved for it, as dicts."""
        return [
            {**hit.passage.to_dict(), "score": hit.score} for hit in self.search(question, self.k if k is None else k)
        ]


def _margin(total, order) -> float:
    """How far the best score leads the second best (0 where there is none)."""
    best = float(total[order[0]]) if len(order) else 0.0
    second = float(total[order[1]]) if len(order) > 1 else 0.0
    return best - second


@dataclass(frozen=True)
class Gate:
    """Passages only for a query whose best passage leads the next by `min_margin` (0: always)."""

    min_margin: float = 0.0
    calibration: str = ""  # how min_margin was set, for the artifact's reader

    def to_dict(self) -> dict:
        return {"min_margin": self.min_margin, "calibration": self.calibration}

    @classmethod
    def from_settings(cls, settings, path: Path) -> Gate:
        if settings is None:
            return cls()
        margin = settings.get("min_margin") if isinstance(settings, dict) else None
        if not isinstance(margin, int | float) or isinstance(margin, bool) or not margin >= 0:
            raise DataError(f"{path}: gate.min_margin must be a number >= 0, not {margin!r}")
        return cls(float(margin), str(settings.get("calibration", "")))


def calibrate_gate(index: RetrievalIndex, row_ids: Sequence[int], seed: int) -> Gate:
    """The gate at GATE_QUANTILE of the rows' leave-one-out margins (a seeded sample of GATE_MAX_QUERIES rows at
    most); no gate (min_margin 0) under GATE_MIN_ROWS rows."""
    import numpy as np

    ids = list(row_ids)
    if len(ids) > GATE_MAX_QUERIES:
        ids = sorted(random.Random(f"gate:{seed}").sample(ids, GATE_MAX_QUERIES))
    if len(ids) < GATE_MIN_ROWS:
        return Gate(calibration=f"auto: {len(ids)} training rows to calibrate on, fewer than {GATE_MIN_ROWS}")
    margins = index.leave_one_out_margins(ids)
    if len(margins) < GATE_MIN_ROWS:  # the others' questions hold no word to search with
        return Gate(calibration=f"auto: {len(margins)} searchable training questions, fewer than {GATE_MIN_ROWS}")
    min_margin = round(float(np.quantile(margins, GATE_QUANTILE)), 4)
    return Gate(
        min_margin,
        f"quantile {GATE_QUANTILE:g} of {len(margins)} training rows' margins with their own passage left out",
    )


def _tokenize(texts: list[str], return_ids: bool):
    import bm25s
    import Stemmer

    return bm25s.tokenize(
        texts,
        stopwords=STOPWORDS,
        stemmer=Stemmer.Stemmer(STEMMER),
        token_pattern=TOKEN_PATTERN,
        return_ids=return_ids,
        show_progress=False,
    )


# > Passages from the training rows and the documents channel


def row_source(example_source: str) -> str:
    """A training row's passage source, `<file name>#<row>`, from data.py's `<file name>:row <row>`."""
    name, sep, row = example_source.rpartition(":row ")
    return f"{name}#{row}" if sep else example_source


def passages_from_rows(examples: Sequence) -> list[Passage]:
    """One passage per training row (trainer.data.Example): title = its question, text = its answer (the context
    column is not part of it); ids in row order."""
    return [Passage(i, e.question, e.answer, row_source(e.source)) for i, e in enumerate(examples)]


def passages_from_documents(channel_dir: Path) -> list[Passage]:
    """Every .txt/.md file in the channel (sorted, recursive), split into passages (`split_document`).

    DataError, naming the file, for a file that is not UTF-8, is empty, or is of another kind; and for a channel
    without any document."""
    channel_dir = Path(channel_dir)
    files = sorted(p for p in channel_dir.rglob("*") if p.is_file() and not _hidden(p.relative_to(channel_dir)))
    others = [p for p in files if p.suffix.lower() not in DOCUMENT_SUFFIXES]
    if others:
        raise DataError(
            f"{others[0]}: the documents channel takes plain-text and Markdown files ({', '.join(DOCUMENT_SUFFIXES)}); "
            "convert it to one of those or leave it out"
        )
    if not files:
        raise DataError(f"no document in {channel_dir}: expected {', '.join(DOCUMENT_SUFFIXES)} files")
    passages: list[Passage] = []
    for path in files:
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save the document as UTF-8") from e
        if not text.strip():
            raise DataError(f"{path}: the document is empty")
        relative = path.relative_to(channel_dir).as_posix()
        markdown = path.suffix.lower() != ".txt"
        pieces = split_document(text, markdown=markdown)
        if not pieces:
            raise DataError(f"{path}: the document holds no text outside its headings")
        for n, (heading, body) in enumerate(pieces, start=1):
            title = f"{path.name}: {heading}" if heading else path.name
            passages.append(Passage(len(passages), title, body, f"{relative}#p{n}"))
    return passages


def split_document(text: str, markdown: bool = True) -> list[tuple[str, str]]:
    """(heading path, text) passages of a document: sections at Markdown headings (heading path "A > B"; "" before
    the first), paragraphs at blank lines, merged within a section up to MAX_PASSAGE_WORDS and split above it."""
    passages = []
    for heading, paragraphs in _sections(text, markdown):
        units = [piece for paragraph in paragraphs for piece in _split_long(paragraph)]
        passages.extend((heading, chunk) for chunk in _pack(units))
    return passages


def _sections(text: str, markdown: bool) -> list[tuple[str, list[str]]]:
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    sections: list[tuple[str, list[str]]] = []
    headings: list[tuple[int, str]] = []
    paragraphs: list[str] = []
    current: list[str] = []
    fence = None

    def end_paragraph() -> None:
        if current:
            paragraphs.append("\n".join(current).strip("\n"))
            current.clear()

    def end_section() -> None:
        end_paragraph()
        if paragraphs:
            sections.append((" > ".join(title for _, title in headings), list(paragraphs)))
            paragraphs.clear()

    for line in lines:
        if markdown and (opened := _FENCE.match(line)):
            if fence is None:
                end_paragraph()
                fence = opened.group(1)
            elif opened.group(1) == fence:
                fence = None
            current.append(line.rstrip())
            continue
        if fence is not None:  # inside a code block: blank lines and `#` lines are code
            current.append(line.rstrip())
            continue
        heading = _HEADING.match(line) if markdown else None
        if heading:
            end_section()
            level = len(heading.group(1))
            headings = [(lvl, title) for lvl, title in headings if lvl < level]
            if heading.group(2).strip():
                headings.append((level, heading.group(2).strip()))
        elif not line.strip():
            end_paragraph()
        else:
            current.append(line.rstrip())
    end_section()
    return sections


def _words(text: str) -> int:
    return len(text.split())


def _split_long(paragraph: str) -> list[str]:
    """A paragraph of at most MAX_PASSAGE_WORDS words as is; a longer one in balanced pieces, cut at line ends
    where it has several lines, else between words."""
    words = _words(paragraph)
    if words <= MAX_PASSAGE_WORDS:
        return [paragraph]
    lines = paragraph.split("\n")
    if len(lines) > 1 and all(_words(line) <= MAX_PASSAGE_WORDS for line in lines):
        return ["\n".join(chunk) for chunk in _balanced(lines)]
    tokens = paragraph.split()
    size = math.ceil(len(tokens) / math.ceil(len(tokens) / MAX_PASSAGE_WORDS))
    return [" ".join(tokens[i : i + size]) for i in range(0, len(tokens), size)]


def _balanced(units: list[str]) -> list[list[str]]:
    """Consecutive units grouped into about equal groups of at most MAX_PASSAGE_WORDS words each."""
    total = sum(_words(u) for u in units)
    target = math.ceil(total / math.ceil(total / MAX_PASSAGE_WORDS))
    groups: list[list[str]] = [[]]
    size = 0
    for unit in units:
        n = _words(unit)
        if groups[-1] and (size + n > MAX_PASSAGE_WORDS or size >= target):
            groups.append([])
            size = 0
        groups[-1].append(unit)
        size += n
    return groups


def _pack(units: list[str]) -> list[str]:
    """A section's paragraphs merged into passages of about MIN..MAX words; a short last one joins the one before
    it when both fit in MAX_PASSAGE_WORDS."""
    if not units:
        return []
    chunks = ["\n\n".join(group) for group in _balanced(units)]
    short_last = len(chunks) > 1 and _words(chunks[-1]) < MIN_PASSAGE_WORDS
    if short_last and _words(chunks[-2]) + _words(chunks[-1]) <= MAX_PASSAGE_WORDS:
        chunks[-2:] = [chunks[-2] + "\n\n" + chunks[-1]]
    return chunks


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


# > RAFT: the documents of each training example


@dataclass(frozen=True)
class RaftDocuments:
    passages: tuple[Passage, ...]
    gold: bool  # whether the example's own passage is among them

    def documents(self) -> list[dict[str, str]]:
        return [{"title": p.title, "text": p.text} for p in self.passages]


def raft_documents(
    index: RetrievalIndex,
    questions: Sequence[str],
    gold_ids: Sequence[int],
    *,
    k: int,
    gold_fraction: float,
    seed: int,
    context_fraction: float = 1.0,
) -> list[RaftDocuments]:
    """The documents of each training example (question i, whose own passage is `gold_ids[i]`).

    A seeded `context_fraction` of the examples (round(fraction × examples) of them) get documents. The others get
    none and train on the question alone (closed book): they teach the answers themselves, at the cost of a plain
    example, where k passages make an example several times longer.

    For an example with documents, retrieval ranks k + RAFT_CANDIDATES passages for the question; the distractors
    are those other than the gold. With probability `gold_fraction` (a draw seeded by `seed` and the example's
    position, so a rerun gives the same documents): the gold passage and the top k - 1 distractors, the gold at the
    rank retrieval gave it, or at a random position among the k when retrieval did not rank it in the top k.
    Otherwise: the top k distractors, so the model also learns to answer from memory when the passages miss. Where
    retrieval finds too few distractors (no shared words), the rest are drawn at random from the other passages:
    every example with documents has distractors while the index has passages enough.
    """
    if len(questions) != len(gold_ids):
        raise ValueError(f"{len(questions)} questions for {len(gold_ids)} gold passages")
    with_context = set(
        random.Random(f"raft-context:{seed}").sample(range(len(questions)), round(context_fraction * len(questions)))
    )
    result = []
    for i, (question, gold_id) in enumerate(zip(questions, gold_ids, strict=True)):
        if i not in with_context:
            result.append(RaftDocuments((), False))
            continue
        rng = random.Random(f"raft:{seed}:{i}")
        with_gold = rng.random() < gold_fraction
        ranked = [hit.passage for hit in index.search(question, k + RAFT_CANDIDATES, gated=False)]
        distractors = [p for p in ranked if p.id != gold_id]
        wanted = k - 1 if with_gold else k
        if len(distractors) < wanted:
            taken = {p.id for p in distractors} | {gold_id}
            others = [p for p in index.passages if p.id not in taken]
            distractors += rng.sample(others, min(wanted - len(distractors), len(others)))
        chosen = distractors[:wanted]
        if with_gold:
            rank = next((r for r, p in enumerate(ranked) if p.id == gold_id), None)
            position = rank if rank is not None and rank < k else rng.randrange(k)
            chosen.insert(min(position, len(chosen)), index.passages[gold_id])
        result.append(RaftDocuments(tuple(chosen), with_gold))
    return result
