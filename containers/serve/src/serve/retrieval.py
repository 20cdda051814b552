"""The artifact's retrieval index (`model/retrieval/`, written by the training image): its passages, two BM25
indexes (titles, texts), optionally the titles' word embeddings, and how to score a query against them. The
serving image's own reader of that format: no training code is imported, and the scoring below is the
contract's, so both images rank passages alike.

Layout (format_version 1):
- `retrieval.json`: format_version, library ("bm25s"), bm25s_version, stopwords, stemmer, token_pattern,
  field_weights ({"title": w, "text": w}), k (passages per request), passages (their number); optionally
  dense: {library ("wordllama"), library_version, config, dim, field_weights ({field: w})}; optionally
  gate: {min_margin (a number >= 0), calibration (how the training image set it)}.
- `passages.jsonl`: one `{"id", "title", "text", "source"}` per line, ids 0..N-1 in order.
- `bm25_title/`, `bm25_text/`: `bm25s.BM25` indexes over the passages' titles and texts, in id order.
- `dense_<field>.npy` (with `dense`): float32 [N, dim], each passage's WordLlama embedding, L2-normalised.

Scoring: the query's tokens (bm25s.tokenize with the recorded stopwords, PyStemmer stemmer and token pattern); a
query without any retrieves nothing. Per BM25 field, the scores divided by their maximum (0 when the maximum is
0); per dense field, the cosine of the query's embedding with each passage's, scaled to [0, 1] over the passages
(min to max; 0 when all are equal); a passage's score is the weighted sum of them all; the top k by score, ties to
the lower id; passages scoring 0 are never returned. With a gate: a query whose best passage's score leads the
second best's (0 without one) by less than min_margin gets no passages (the training image's evaluation went
through the same gate; trainer/retrieval.py says why it is there and how it is set).
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
DENSE_LIBRARY = "wordllama"
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
    """A retrieved passage and its fused score."""

    passage: Passage
    score: float  # 0 < score <= the sum of the BM25 and dense field weights

    def document(self) -> dict[str, str]:
        """What the chat template's `documents` takes."""
        return {"title": self.passage.title, "text": self.passage.text}

    def source(self) -> dict[str, Any]:
        """What a reply's `sources` lists."""
        p = self.passage
        return {"id": p.id, "title": p.title, "source": p.source, "score": self.score}


class DenseScorer:
    """The passages' word embeddings per field and the model that embeds queries (WordLlama: a token-embedding
    table and mean pooling, read-only, so one instance serves every thread)."""

    def __init__(self, model: Any, embeddings: dict[str, Any], weights: dict[str, float]):
        self.model = model
        self.embeddings = embeddings  # field -> float32 [N, dim]
        self.weights = weights

    def scores(self, query: str):
        import numpy as np

        query_vector = self.model.embed([query], norm=True)[0]
        total = None
        for field, weight in self.weights.items():
            cosines = np.asarray(self.embeddings[field] @ query_vector, dtype=np.float64)
            spread = float(cosines.max() - cosines.min())
            scaled = (cosines - cosines.min()) / spread if spread > 0 else np.zeros_like(cosines)
            total = weight * scaled if total is None else total + weight * scaled
        return total


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
        dense: DenseScorer | None = None,
        min_margin: float = 0.0,
    ):
        self.directory = directory
        self.passages = passages
        self.indexes = indexes
        self.weights = weights
        self.k = k
        self.stopwords = stopwords
        self.stemmer = stemmer  # PyStemmer's algorithm name
        self.token_pattern = token_pattern
        self.dense = dense
        self.min_margin = min_margin
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

    def search(self, query: str, k: int | None = None, gated: bool = True) -> list[Hit]:
        """The top `k` (default: the index's k) passages for `query`, best first; fewer when fewer score above 0;
        none when `gated` and the best does not lead the second best by the gate's min_margin."""
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
            if self.dense is not None:
                total += self.dense.scores(query)
        # Score descending, then id ascending: a stable sort of the ids (already ascending) by -score.
        order = np.argsort(-total, kind="stable")
        if gated and _margin(total, order) < self.min_margin:
            return []
        return [Hit(self.passages[i], float(total[i])) for i in order[:k] if total[i] > 0]


def _margin(total, order) -> float:
    """How far the best score leads the second best (0 where there is none)."""
    best = float(total[order[0]]) if len(order) else 0.0
    second = float(total[order[1]]) if len(order) > 1 else 0.0
    return best - second


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
    dense = _load_dense(directory, meta["dense"], count) if meta.get("dense") is not None else None
    min_margin = _gate_margin(meta.get("gate"), meta_path)
    log.info(
        "retrieval index %s: %d passages, k=%d, BM25%s, %s",
        directory,
        count,
        k,
        f" and {DENSE_LIBRARY} embeddings ({', '.join(dense.weights)})" if dense else "",
        f"passages where the best leads by {min_margin:g} or more" if min_margin > 0 else "no gate",
    )
    return RetrievalIndex(
        directory,
        passages,
        indexes,
        {f: float(weights[f]) for f in FIELDS},
        k,
        stopwords,
        stemmer_name,
        token_pattern,
        dense,
        min_margin,
    )


def _gate_margin(gate: Any, meta_path: Path) -> float:
    """retrieval.json's `gate.min_margin` (0 without a gate)."""
    if gate is None:
        return 0.0
    margin = gate.get("min_margin") if isinstance(gate, dict) else None
    if not isinstance(margin, int | float) or isinstance(margin, bool) or not margin >= 0:
        raise RetrievalIndexError(f"{meta_path}: gate.min_margin must be a number >= 0, not {margin!r}")
    return float(margin)


def _load_dense(directory: Path, settings: Any, count: int) -> DenseScorer:
    """retrieval.json's `dense` part: the model named there (from the wordllama package's own files, never the
    network) and each field's embeddings."""
    from importlib.metadata import version

    import numpy as np

    meta_path = directory / INDEX_FILE
    if not isinstance(settings, dict) or settings.get("library") != DENSE_LIBRARY:
        library = settings.get("library") if isinstance(settings, dict) else settings
        raise RetrievalIndexError(f"{meta_path}: dense.library {library!r}; this server reads {DENSE_LIBRARY!r}")
    weights = settings.get("field_weights")
    if (
        not isinstance(weights, dict)
        or not weights
        or not set(weights) <= set(FIELDS)
        or not all(isinstance(w, int | float) and not isinstance(w, bool) and w >= 0 for w in weights.values())
    ):
        raise RetrievalIndexError(
            f"{meta_path}: dense.field_weights must map some of {list(FIELDS)} to numbers >= 0, not {weights!r}"
        )
    dim = _int_field(settings, "dim", meta_path, minimum=1)
    model = _load_word_embeddings(meta_path, settings.get("config"), dim)
    embeddings = {}
    for field in weights:
        path = directory / f"dense_{field}.npy"
        try:
            vectors = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise RetrievalIndexError(f"{path}: not readable embeddings ({e})") from e
        if vectors.shape != (count, dim):
            raise RetrievalIndexError(f"{path}: shape {vectors.shape}, but {meta_path} records ({count}, {dim})")
        embeddings[field] = vectors
    installed = version(DENSE_LIBRARY)
    if settings.get("library_version") != installed:
        log.warning(
            "%s: embeddings made by %s %s; this server has %s",
            meta_path,
            DENSE_LIBRARY,
            settings.get("library_version"),
            installed,
        )
    return DenseScorer(model, embeddings, {f: float(w) for f, w in weights.items()})


def _load_word_embeddings(meta_path: Path, config: Any, dim: int) -> Any:
    """WordLlama's model `config` at `dim` dimensions, from its wheel's own files. Its loader looks for the
    tokenizer's file in the package's `tokenizer/` folder, while the wheel ships it in `tokenizers/`; its cache
    layout (`tokenizers/`, `weights/`) is the package's, so the package folder as the cache finds both."""
    try:
        import wordllama
    except ImportError as e:  # the image lists it in requirements.txt
        raise RetrievalIndexError(f"{meta_path}: its embeddings need the {DENSE_LIBRARY} package ({e})") from e
    known = wordllama.WordLlama.list_configs().get("wordllama", [])
    if config not in known:
        raise RetrievalIndexError(f"{meta_path}: dense model {config!r} is not one of WordLlama's ({known})")
    try:
        return wordllama.WordLlama.load(
            config=config, dim=dim, cache_dir=Path(wordllama.__file__).parent, disable_download=True
        )
    except (FileNotFoundError, ValueError) as e:  # a dimension its wheel does not ship (or it does not offer)
        raise RetrievalIndexError(
            f"{meta_path}: dense model {config!r} at {dim} dimensions is not one this server has ({e})"
        ) from e


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
