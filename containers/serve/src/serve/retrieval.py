"""The artifact's retrieval index (`model/retrieval/`, written by the training image): its passages, two BM25
indexes (titles, texts) and how to score a query against them. The serving image's own reader of that format:
no training code is imported, and the scoring below is the contract's, so both images rank passages alike.

Layout (format_version 1):
- `retrieval.json`: format_version, library ("bm25s"), bm25s_version, stopwords, stemmer, token_pattern,
  field_weights ({"title": w, "text": w}), k (passages per request), passages (their number).
- `passages.jsonl`: one `{"id", "title", "text", "source"}` per line, ids 0..N-1 in order.
- `bm25_title/`, `bm25_text/`: `bm25s.BM25` indexes over the passages' titles and texts, in id order.

Scoring: the query's tokens (bm25s.tokenize with the recorded stopwords, PyStemmer stemmer and token pattern);
per field, BM25 scores divided by their maximum (0 when the maximum is 0); a passage's score is the weighted
sum; the top k by score, ties to the lower id; passages scoring 0 are never returned.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("serve.retrieval")

FORMAT_VERSION = 1
LIBRARY = "bm25s"
INDEX_FILE = "retrieval.json"
PASSAGES_FILE = "passages.jsonl"
FIELDS = ("title", "text")  # each field's index is in bm25_<field>/
DEFAULT_DIR = "retrieval"  # under the model directory, unless manifest.json's retrieval.dir says otherwise


class RetrievalIndexError(Exception):
    """The artifact's retrieval index is missing a part, unreadable, or not in a format this server reads."""


@dataclass(frozen=True)
class Passage:
    id: int
    title: str
    text: str
    source: str


@dataclass(frozen=True)
class Hit:
    """A retrieved passage and its fused score (0 < score <= the sum of the field weights)."""

    passage: Passage
    score: float

    def document(self) -> dict[str, str]:
        """What the chat template's `documents` takes."""
        return {"title": self.passage.title, "text": self.passage.text}

    def source(self) -> dict[str, Any]:
        """What a reply's `sources` lists."""
        p = self.passage
        return {"id": p.id, "title": p.title, "source": p.source, "score": self.score}


class RetrievalIndex:
    """Passages and their two BM25 indexes, loaded once per worker; `search` is thread-safe (read-only numpy)."""

    def __init__(
        self,
        directory: Path,
        passages: list[Passage],
        indexes: dict[str, Any],
        weights: dict[str, float],
        k: int,
        stopwords: str,
        stemmer: str,
        token_pattern: str,
    ):
        self.directory = directory
        self.passages = passages
        self.indexes = indexes
        self.weights = weights
        self.k = k
        self.stopwords = stopwords
        self.stemmer = stemmer  # PyStemmer's algorithm name
        self.token_pattern = token_pattern
        self._local = threading.local()  # a PyStemmer stemmer per thread: one is not safe to share between threads

    def __len__(self) -> int:
        return len(self.passages)

    def tokens(self, query: str) -> list[str]:
        import bm25s
        import Stemmer

        stemmer = getattr(self._local, "stemmer", None)
        if stemmer is None:
            stemmer = self._local.stemmer = Stemmer.Stemmer(self.stemmer)
        return bm25s.tokenize(
            [query],
            stopwords=self.stopwords,
            stemmer=stemmer,
            token_pattern=self.token_pattern,
            return_ids=False,
            show_progress=False,
        )[0]

    def search(self, query: str, k: int | None = None) -> list[Hit]:
        """The top `k` (default: the index's k) passages for `query`, best first; fewer when fewer score above 0."""
        import numpy as np

        k = self.k if k is None else k
        tokens = self.tokens(query)
        total = np.zeros(len(self.passages), dtype=np.float64)
        if tokens and k > 0:
            for field, index in self.indexes.items():
                scores = np.asarray(index.get_scores(tokens), dtype=np.float64)
                top = float(scores.max(initial=0.0))
                if top > 0:
                    total += self.weights[field] * (scores / top)
        # Score descending, then id ascending: a stable sort of the ids (already ascending) by -score.
        order = np.argsort(-total, kind="stable")[:k]
        return [Hit(self.passages[i], float(total[i])) for i in order if total[i] > 0]


def index_dir(model_dir: Path) -> Path | None:
    """Where the artifact's index is (manifest.json's `retrieval.dir`, else `retrieval/`), or None if it has
    none. manifest.json naming an index that is not there is an error, not "no index"."""
    model_dir = Path(model_dir)
    manifest_path = model_dir / "manifest.json"
    recorded = None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        recorded = manifest.get("retrieval") if isinstance(manifest, dict) else None
    except (OSError, ValueError):
        pass
    if isinstance(recorded, dict):
        directory = model_dir / str(recorded.get("dir") or DEFAULT_DIR)
        if not (directory / INDEX_FILE).is_file():
            raise RetrievalIndexError(
                f"{manifest_path} records a retrieval index in {recorded.get('dir') or DEFAULT_DIR}/, "
                f"but {directory / INDEX_FILE} does not exist"
            )
        return directory
    directory = model_dir / DEFAULT_DIR
    return directory if (directory / INDEX_FILE).is_file() else None


def load_index(model_dir: Path) -> RetrievalIndex | None:
    """The artifact's index, or None when it has none. Raises RetrievalIndexError naming the file at fault."""
    directory = index_dir(model_dir)
    if directory is None:
        return None
    return load(directory)


def load(directory: Path) -> RetrievalIndex:
    """The index in `directory` (a `model/retrieval/`), checked against its retrieval.json."""
    directory = Path(directory)
    meta_path = directory / INDEX_FILE
    meta = _read_json(meta_path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise RetrievalIndexError(
            f"{meta_path}: format_version {meta.get('format_version')!r}; this server reads {FORMAT_VERSION} "
            "(train the model again with a training image of the same release)"
        )
    if meta.get("library") != LIBRARY:
        raise RetrievalIndexError(f"{meta_path}: library {meta.get('library')!r}; this server reads {LIBRARY!r}")
    try:
        import bm25s
        import Stemmer
    except ImportError as e:  # the image lists both in requirements.txt
        raise RetrievalIndexError(f"{meta_path}: reading it needs bm25s and PyStemmer ({e})") from e
    if meta.get("bm25s_version") != bm25s.__version__:
        log.warning(
            "%s was written by bm25s %s; this server has %s", meta_path, meta.get("bm25s_version"), bm25s.__version__
        )
    count = _int_field(meta, "passages", meta_path, minimum=1)
    k = _int_field(meta, "k", meta_path, minimum=1)
    weights = meta.get("field_weights")
    if not isinstance(weights, dict) or set(weights) != set(FIELDS):
        raise RetrievalIndexError(f"{meta_path}: field_weights must give a weight for each of {list(FIELDS)}")
    if not all(isinstance(w, int | float) and not isinstance(w, bool) and w >= 0 for w in weights.values()):
        raise RetrievalIndexError(f"{meta_path}: field_weights must be numbers >= 0, not {weights}")
    token_pattern = meta.get("token_pattern")
    stopwords = meta.get("stopwords")
    if not isinstance(token_pattern, str) or not token_pattern:
        raise RetrievalIndexError(f"{meta_path}: token_pattern must be a regular expression")
    if not isinstance(stopwords, str):
        raise RetrievalIndexError(f"{meta_path}: stopwords must name a bm25s stopword list (such as 'en')")
    stemmer_name = meta.get("stemmer")
    if stemmer_name not in Stemmer.algorithms():
        raise RetrievalIndexError(f"{meta_path}: stemmer {stemmer_name!r} is not one of PyStemmer's algorithms")

    passages = _read_passages(directory / PASSAGES_FILE)
    if len(passages) != count:
        raise RetrievalIndexError(
            f"{directory / PASSAGES_FILE}: {len(passages)} passages, but {meta_path} records {count}"
        )
    indexes = {}
    for field in FIELDS:
        field_dir = directory / f"bm25_{field}"
        try:
            index = bm25s.BM25.load(str(field_dir), load_corpus=False, mmap=False, show_progress=False)
        except Exception as e:  # missing, truncated or foreign files: whatever numpy or json raise
            raise RetrievalIndexError(f"{field_dir}: not a readable bm25s index ({type(e).__name__}: {e})") from e
        if index.scores.get("num_docs") != count:
            raise RetrievalIndexError(
                f"{field_dir}: indexes {index.scores.get('num_docs')} passages, but {meta_path} records {count}"
            )
        indexes[field] = index
    log.info("retrieval index %s: %d passages, k=%d", directory, count, k)
    return RetrievalIndex(
        directory,
        passages,
        indexes,
        {f: float(weights[f]) for f in FIELDS},
        k,
        stopwords,
        stemmer_name,
        token_pattern,
    )


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RetrievalIndexError(f"{path}: cannot be read ({e.strerror or e})") from e
    except ValueError as e:
        raise RetrievalIndexError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise RetrievalIndexError(f"{path}: expected a JSON object")
    return value


def _int_field(meta: dict, name: str, path: Path, *, minimum: int) -> int:
    value = meta.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise RetrievalIndexError(f"{path}: {name} must be an integer >= {minimum}, not {value!r}")
    return value


def _read_passages(path: Path) -> list[Passage]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise RetrievalIndexError(f"{path}: cannot be read ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise RetrievalIndexError(f"{path}: not UTF-8 ({e})") from e
    passages = []
    for number, line in enumerate((line for line in lines if line.strip()), start=1):
        try:
            row = json.loads(line)
        except ValueError as e:
            raise RetrievalIndexError(f"{path}: line {number} is not valid JSON ({e})") from e
        if not isinstance(row, dict):
            raise RetrievalIndexError(f"{path}: line {number} is not a JSON object")
        wrong = [key for key in ("title", "text", "source") if not isinstance(row.get(key), str)]
        if wrong:
            raise RetrievalIndexError(f"{path}: line {number}: {', '.join(wrong)} must be strings")
        if row.get("id") != number - 1 or isinstance(row.get("id"), bool):
            raise RetrievalIndexError(
                f"{path}: line {number} has id {row.get('id')!r}; passages must be in id order, from 0"
            )
        passages.append(Passage(number - 1, row["title"], row["text"], row["source"]))
    return passages
