#!/usr/bin/env python3
"""Does training with retrieval (RAFT) answer reworded questions? Today's default job against a retrieval job, one run.

    .venv/bin/python benchmarks/retrieval_faq.py --faq data/Amazon_SageMaker_FAQs.csv   # about an hour, 2 cores
    .venv/bin/python benchmarks/retrieval_faq.py --faq data/Amazon_SageMaker_FAQs.csv --recall-only   # seconds
    .venv/bin/python benchmarks/retrieval_faq.py --faq PATH --max-steps 4 --train-samples 4 --no-write  # a smoke run
    .venv/bin/python benchmarks/retrieval_faq.py --faq PATH --folds 4   # and 3 more held-out sets, +20 min each

`--faq PATH` names the FAQ CSV (scripts/fetch_faq_dataset.py downloads it; it is not in the repository).

1. The split: held-out = a seeded 15% of the FAQ's questions, drawn only from the questions that
   benchmarks/faq_paraphrases.jsonl does not reword, so that every reworded original is a training question. The
   paraphrased set is each rewording, answered with its original's answer; no job trains on it. With --folds N,
   fold i holds out the i-th such run of questions in the same seeded order (fold 0 is the split), for N
   disjoint held-out sets.
2. Recall@1/3/5 of the retrieval index (trainer.retrieval, the training image's own, built over the training rows
   as a job builds it) on the paraphrased set: a hit is the passage of the reworded original (titled with it).
3. Two jobs of the training image, one after the other, on the same rows with the same settings and evaluation:
   A = today's default without retrieval (`retrieval=off`), B = `retrieval=on` (RAFT: each training example with
   k retrieved passages, its own among them in most) and the gate its job calibrates on its training rows
   (`retrieval_min_margin=auto`). Both answer every held-out question, every paraphrase and the training
   questions (all of them unless --train-samples), greedily. A also evaluates the base model; B evaluates its
   tuned model twice, without retrieval and with it, through the gate as served.
4. One table: a row per question set, ROUGE-L of base / A / B without retrieval / B with retrieval, how many
   questions passed B's gate, and B's recall (the share of questions whose gold passage was among the k in the
   prompt); the training time of B over
   A (the training phase, as each job records it in manifest.json, `training.runtime_s`); the targets of issue 22.
   And, per set, the paired difference B with retrieval minus A, question by question (sample_answers.jsonl),
   with a 95% bootstrap interval over the questions: on a couple of dozen held-out questions a single answer moves
   the mean by hundredths, so a verdict on the means alone says little without it. With --folds, each further
   fold's A and B (trained on its split, answering only its held-out questions) add a row, and the held-out
   questions of all folds are paired together.
   Written to the `retrieval-faq` section of docs/benchmarks.md unless --no-write.

Jobs run in --jobs-dir (default runs/retrieval-faq); a job whose tree already holds a finished report for the
same hyperparameters and data is not run again, so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import DOCS, REPO, write_section
from train_vs_trl import TRAIN, add_faq_argument, check_faq, shown

PARAPHRASES = REPO / "benchmarks" / "faq_paraphrases.jsonl"
DOCS_SECTION = "retrieval-faq"
HELD_OUT_FRACTION = 0.15  # as the image's validation_fraction
SEED = 42  # as the image's seed
RECALL_KS = (1, 3, 5)
SETS = (("train_sample", "training"), ("validation", "held-out"), ("paraphrased", "paraphrased"))
# Issue 22's targets.
TARGET_PARAPHRASED = 0.60  # ROUGE-L on paraphrases, with retrieval
TARGET_TRAINING = 0.60  # ROUGE-L on training questions (with retrieval, as served)
TARGET_TIME_RATIO = 1.5  # training time, B over A
TARGET_RECALL_AT_3 = 0.9  # of the index, on the paraphrases
BOOTSTRAP_RESAMPLES = 10_000
PAIRED_TIE = 0.005  # a difference of ROUGE-L this small counts as neither better nor worse


def _normal(text: str) -> str:
    return " ".join(text.split())


# > 1. The split


@dataclass
class Split:
    train: list  # trainer.data.Example
    held_out: list
    paraphrased: list  # a rewording as question, its original's answer as answer
    originals: list[str]  # per paraphrase, the training question it rewords


def load_faq(faq: Path) -> list:
    """The FAQ's rows as the training image reads them (cleaned, exact duplicates dropped)."""
    from trainer.data import load_channel

    with tempfile.TemporaryDirectory(prefix="faq-") as tmp:
        shutil.copy(faq, Path(tmp) / faq.name)
        examples, _ = load_channel(Path(tmp))
    return examples


def read_paraphrases(path: Path) -> list[tuple[str, str]]:
    """(original question, rewording) pairs."""
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            record = json.loads(line)
            if not record.get("question") or not record.get("paraphrase"):
                sys.exit(f"{path}:{number}: needs a question and a paraphrase")
            pairs.append((record["question"], record["paraphrase"]))
    return pairs


def split_faq(examples: list, paraphrases: list[tuple[str, str]], seed: int = SEED, fold: int = 0) -> Split:
    """Held-out questions drawn (seeded, HELD_OUT_FRACTION of all questions) from those not reworded; the
    rewordings answered with their original's answer (the first, for a question asked twice). `fold` i holds out
    the i-th run of that many in the seeded order, so folds never share a held-out question and fold 0 is the
    benchmark's own split."""
    from trainer.data import Example

    answer_of: dict[str, str] = {}
    question_of: dict[str, str] = {}
    for e in examples:
        answer_of.setdefault(_normal(e.question), e.answer)
        question_of.setdefault(_normal(e.question), e.question)
    missing = [q for q, _ in paraphrases if _normal(q) not in answer_of]
    if missing:
        sys.exit(f"{len(missing)} reworded question(s) are not questions of the FAQ, e.g. {missing[0]!r}")
    candidates, size = held_out_candidates(examples, paraphrases)
    random.Random(seed).shuffle(candidates)
    if fold < 0 or (fold + 1) * size > len(candidates):
        raise ValueError(f"fold {fold}: {len(candidates)} questions not reworded make {len(candidates) // size} folds")
    held = set(candidates[fold * size : (fold + 1) * size])
    paraphrased = [
        Example(p, answer_of[_normal(q)], "", f"{PARAPHRASES.name}:row {i}") for i, (q, p) in enumerate(paraphrases, 1)
    ]
    return Split(
        train=[e for e in examples if e.question not in held],
        held_out=[e for e in examples if e.question in held],
        paraphrased=paraphrased,
        originals=[question_of[_normal(q)] for q, _ in paraphrases],
    )


def held_out_candidates(examples: list, paraphrases: list[tuple[str, str]]) -> tuple[list[str], int]:
    """The questions that may be held out (those not reworded, sorted) and how many a split holds out."""
    reworded = {_normal(q) for q, _ in paraphrases}
    questions = sorted({e.question for e in examples})
    return [q for q in questions if _normal(q) not in reworded], max(1, round(HELD_OUT_FRACTION * len(questions)))


def fold_count(examples: list, paraphrases: list[tuple[str, str]]) -> int:
    """How many disjoint held-out folds the questions not reworded make."""
    candidates, size = held_out_candidates(examples, paraphrases)
    return len(candidates) // size


# > 2. Recall of the index


def index_recall(
    train: list, queries: list[str], gold_titles: list[str], ks=RECALL_KS, dense: bool = True
) -> dict[int, float]:
    """Recall@k of the image's index over the training rows (`dense`: with the titles' embeddings, as
    `retrieval_dense` builds it): the share of queries whose gold passage (the one titled `gold_titles[i]`) is
    among the top k."""
    from trainer.retrieval import RetrievalIndex, passages_from_rows

    index = RetrievalIndex.build(passages_from_rows(train), dense=dense)
    ranks = []
    for query, gold in zip(queries, gold_titles, strict=True):
        titles = [_normal(hit.passage.title) for hit in index.search(query, max(ks))]
        ranks.append(titles.index(_normal(gold)) + 1 if _normal(gold) in titles else None)
    return {k: sum(r is not None and r <= k for r in ranks) / len(ranks) for k in ks}


# > 3. The jobs


def write_channel(path: Path, examples: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps({"question": e.question, "answer": e.answer}, ensure_ascii=False) + "\n" for e in examples),
        encoding="utf-8",
    )


def job_hyperparameters(split: Split, args) -> dict[str, dict]:
    """A and B: the same settings and evaluation but for retrieval (B's base model is A's: not evaluated again)."""
    common = {
        "epochs": args.epochs,
        "seed": SEED,
        "eval_max_samples": max(len(split.held_out), len(split.paraphrased)),  # caps held-out and paraphrased alike
        "eval_train_samples": args.train_samples or len(split.train),
    }
    if args.model_id:
        common["model_id"] = args.model_id
    if args.max_steps > 0:
        common["max_steps"] = args.max_steps
    if args.max_new_tokens:
        common["eval_max_new_tokens"] = args.max_new_tokens
    common.update(args.hp)
    b = {"retrieval_min_margin": "auto", **common, "retrieval": "on", "eval_base_model": False}
    return {"A": {**common, "retrieval": "off"}, "B": b}


def fold_hyperparameters(split: Split, args) -> dict[str, dict]:
    """A and B of a further fold: the same training, but only the held-out questions answered (no base model, no
    training questions, no GGUF): that is all a fold adds, at a third of a full job's time."""
    light = {
        "eval_max_samples": len(split.held_out),
        "eval_train_samples": 0,
        "eval_base_model": False,
        "eval_gguf": False,
        "gguf_quantization": "none",
    }
    return {name: {**hyperparameters, **light} for name, hyperparameters in job_hyperparameters(split, args).items()}


def lay_out_job(job: Path, hyperparameters: dict, split: Split, paraphrases: bool = True) -> bool:
    """The job's SageMaker tree; False when it already holds a finished report of these same inputs."""
    channels = {"train": split.train, "validation": split.held_out}
    if paraphrases:
        channels["paraphrases"] = split.paraphrased
    inputs = {
        "hyperparameters": {k: str(v) for k, v in hyperparameters.items()},
        "channels": {name: [[e.question, e.answer] for e in rows] for name, rows in channels.items()},
    }
    stamp = job / "benchmark_inputs.json"
    finished = (job / "output" / "data" / "eval_report.json").exists() and (job / "model" / "manifest.json").exists()
    if finished and stamp.exists() and json.loads(stamp.read_text(encoding="utf-8")) == inputs:
        return False
    if job.exists():
        shutil.rmtree(job)  # an unfinished or different earlier run
    for name, rows in channels.items():
        write_channel(job / "input" / "data" / name / f"{name}.jsonl", rows)
    (job / "input" / "config").mkdir(parents=True)
    (job / "input" / "config" / "hyperparameters.json").write_text(json.dumps(inputs["hyperparameters"]))
    stamp.write_text(json.dumps(inputs), encoding="utf-8")
    return True


def run_job(name: str, job: Path, timeout: float | None = None) -> None:
    """The training image's entry point on the job tree, as SageMaker would start it; its log in job/log.txt."""
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(job), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    print(f"job {name}: training in {job}, log {job / 'log.txt'} ...", flush=True)
    started = time.monotonic()
    with open(job / "log.txt", "w") as log:
        code = subprocess.run(
            [sys.executable, str(TRAIN)], env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
        ).returncode
    if code != 0:
        tail = (job / "log.txt").read_text(errors="replace")[-4000:]
        sys.exit(f"job {name} failed (exit {code}):\n{tail}")
    print(f"job {name}: done after {time.monotonic() - started:.0f} s", flush=True)


def run_jobs(jobs_dir: Path, hyperparameters: dict[str, dict], split: Split, fold: int = 0) -> dict[str, JobResult]:
    """Each job of `hyperparameters` on `split`, in jobs_dir/NAME, unless it finished there earlier."""
    results = {}
    for name, values in hyperparameters.items():
        label = f"{name} (fold {fold})" if fold else name
        job = (jobs_dir / name).resolve()
        if lay_out_job(job, values, split, paraphrases=not fold):
            run_job(label, job)
        else:
            print(f"job {label}: finished earlier in {job}, reused", flush=True)
        results[name] = read_job(job)
    return results


@dataclass
class JobResult:
    comparison: dict  # eval_report.json's comparison (trainer.report.comparison)
    training: dict  # manifest.json's training: steps, runtime_s (the training phase), ...
    retrieval: dict | None  # manifest.json's retrieval
    answers: list[dict]  # sample_answers.jsonl: every question's answers, one row each


def read_job(job: Path) -> JobResult:
    from trainer.report import SAMPLES_FILE

    manifest = json.loads((job / "model" / "manifest.json").read_text(encoding="utf-8"))
    report = json.loads((job / "output" / "data" / "eval_report.json").read_text(encoding="utf-8"))
    lines = (job / "output" / "data" / SAMPLES_FILE).read_text(encoding="utf-8").splitlines()
    answers = [json.loads(line) for line in lines if line.strip()]
    return JobResult(report["comparison"], manifest["training"], manifest.get("retrieval"), answers)


@dataclass
class Paired:
    mean: float  # of B with retrieval minus A, per question
    low: float | None  # the 95% bootstrap interval of the mean (None under 2 questions)
    high: float | None
    better: int  # questions where B scores higher by more than PAIRED_TIE
    worse: int
    count: int  # questions paired

    def text(self) -> str:
        interval = "" if self.low is None else f" [{self.low:+.3f}, {self.high:+.3f}]"
        return f"{self.mean:+.3f}{interval}, {self.better} better, {self.worse} worse"


def paired(a: JobResult, b: JobResult, set_name: str) -> Paired | None:
    """B's answers with retrieval against A's tuned answers on the same questions of `set_name`, ROUGE-L."""
    differences = paired_differences(a, b, set_name)
    return None if differences is None else summarize(differences)


def paired_differences(a: JobResult, b: JobResult, set_name: str) -> list[float] | None:
    """Per question of `set_name`, ROUGE-L of B's answer with retrieval minus A's tuned answer's."""
    from trainer.evaluation import rouge_l

    rows_a = [r for r in a.answers if r["set"] == set_name]
    rows_b = [r for r in b.answers if r["set"] == set_name]
    if not rows_a or [r["question"] for r in rows_a] != [r["question"] for r in rows_b]:
        return None  # a job of another split or an older report: nothing to pair
    pairs = [
        (x.get("tuned_answer"), y.get("tuned_retrieval_answer"), x["reference"])
        for x, y in zip(rows_a, rows_b, strict=True)
    ]
    if any(answer is None for pair in pairs for answer in pair[:2]):
        return None  # a column that job did not evaluate
    return [rouge_l(with_b, ref) - rouge_l(with_a, ref) for with_a, with_b, ref in pairs]


def summarize(per_question: list[float]) -> Paired:
    """The mean difference, its seeded 95% bootstrap interval, and the questions better and worse."""
    import numpy as np
    from scipy.stats import bootstrap

    differences = np.array(per_question)
    low = high = None
    if len(differences) >= 2 and np.ptp(differences) > 0:  # percentile: BCa is undefined where all are equal
        interval = bootstrap(
            (differences,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile", random_state=SEED
        ).confidence_interval
        low, high = float(interval.low), float(interval.high)
    return Paired(
        float(differences.mean()),
        low,
        high,
        int((differences > PAIRED_TIE).sum()),
        int((differences < -PAIRED_TIE).sum()),
        len(differences),
    )


# > 4. The table


def _value(a: JobResult | None, set_name: str, column: str, metric: str = "rouge_l") -> float | None:
    return (((a.comparison if a else {}).get(set_name) or {}).get(metric) or {}).get(column)


def _cell(value: float | None, bold: bool = False) -> str:
    if value is None:
        return "-"
    return f"**{value:.3f}**" if bold else f"{value:.3f}"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def _gate_text(b: JobResult) -> str:
    gate = (b.retrieval or {}).get("min_margin")
    if gate is None:
        return "none recorded"
    return f"`retrieval_min_margin`: {gate:.3f}" if gate > 0 else "none: every question gets passages"


def dense_index(args) -> bool:
    """Whether B's index has the titles' embeddings: `retrieval_dense` as the image reads the --hp values."""
    from trainer.config import TrainConfig

    return TrainConfig.from_hyperparameters(args.hp).retrieval_dense


def _recall_text(recall: dict[int, float]) -> str:
    return ", ".join(f"@{n} {value:.3f}" for n, value in recall.items())


def fold_rows(folds: list[tuple[JobResult, JobResult]]) -> tuple[list[str], Paired | None]:
    """A table row per fold's held-out questions and one for all of them; the paired difference over all (None
    when a fold's jobs cannot be paired)."""
    rows, pooled, means = [], [], {"tuned": [], "b_tuned": [], "b_retrieval": []}
    for number, (a, b) in enumerate(folds):
        differences = paired_differences(a, b, "validation")
        if differences is None:
            return [], None
        count = len(differences)
        values = {
            "tuned": _value(a, "validation", "tuned"),
            "b_tuned": _value(b, "validation", "tuned"),
            "b_retrieval": _value(b, "validation", "tuned_retrieval"),
        }
        for key, value in values.items():
            means[key].append((value, count))
        pooled += differences
        gate = (b.retrieval or {}).get("min_margin")
        rows.append(
            f"| {number} ({count}) | {_cell(values['tuned'])} | {_cell(values['b_tuned'])} | "
            f"{_cell(values['b_retrieval'])} | {'-' if gate is None else f'{gate:.3f}'} | "
            f"{_given_passages(b)} | {summarize(differences).text()} |"
        )
    overall = summarize(pooled)

    def weighted(pairs: list[tuple[float | None, int]]) -> float | None:
        if any(value is None for value, _ in pairs):
            return None
        return sum(value * count for value, count in pairs) / sum(count for _, count in pairs)

    rows.append(
        f"| all ({overall.count}) | {_cell(weighted(means['tuned']))} | {_cell(weighted(means['b_tuned']))} | "
        f"{_cell(weighted(means['b_retrieval']), bold=True)} | | {_given_passages(*(b for _, b in folds))} | "
        f"**{overall.text()}** |"
    )
    return rows, overall


def _given_passages(*jobs: JobResult, set_name: str = "validation") -> str:
    """How many of the set's questions passed B's gate, "n of m" over `jobs` ("-": not recorded)."""
    given = total = 0
    for job in jobs:
        rows = job.comparison.get(set_name) or {}
        with_passages = (rows.get("retrieval") or {}).get("with_passages")
        if with_passages is None:
            return "-"
        given, total = given + with_passages, total + rows.get("count", 0)
    return f"{given} of {total}"


def table(
    a: JobResult,
    b: JobResult,
    recall: dict[int, float],
    lexical: dict[int, float],
    split: Split,
    args,
    more_folds: list[tuple[JobResult, JobResult]] = (),
) -> str:
    k = (b.retrieval or {}).get("k", 3)
    a_time, b_time = a.training["runtime_s"], b.training["runtime_s"]
    ratio = b_time / a_time if a_time else float("nan")
    options = "".join(
        f" {flag} {value}"
        for flag, value in (
            ("--epochs", format(args.epochs, "g") if args.epochs != 3 else None),
            ("--max-steps", args.max_steps or None),
            ("--train-samples", args.train_samples or None),
            ("--folds", args.folds if args.folds > 1 else None),
            ("--max-new-tokens", args.max_new_tokens or None),
            *(("--hp", f"{k}={v}") for k, v in args.hp.items()),
        )
        if value is not None
    )
    model = f"the model {shown(Path(args.model_id))}" if args.model_id else "SmolLM2-135M-Instruct (embedded)"
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores ({platform.machine()}), "
        f"`benchmarks/retrieval_faq.py --faq {shown(args.faq)}{options}`: two jobs of the training image, one after "
        f"the other, {model}, "
        f"the defaults (LoRA r16) for {format(args.epochs, 'g')} epochs on {len(split.train)} FAQ rows; "
        f"{len(split.held_out)} questions held out (a seeded 15%, none of them reworded); the "
        f"{len(split.paraphrased)} rewordings of training questions in {shown(args.paraphrases)}, answered "
        "with their original's answer, never trained on. A = retrieval off (the default before issue 22); "
        f"B = retrieval on (RAFT, k={k}), its passages only where the best leads the next by its gate "
        f"({_gate_text(b)}). Greedy answers, ROUGE-L:",
        "",
        "| questions | base | A tuned | B tuned, no retrieval | B tuned + retrieval | B given passages "
        f"| B recall@{k} |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for set_name, title in SETS:
        count = ((b.comparison.get(set_name) or a.comparison.get(set_name)) or {}).get("count")
        if count is None:
            continue
        recall_at_k = ((b.comparison.get(set_name) or {}).get("retrieval") or {}).get("recall_at_k")
        lines.append(
            f"| {title} ({count}) | {_cell(_value(a, set_name, 'base'))} | {_cell(_value(a, set_name, 'tuned'))} | "
            f"{_cell(_value(b, set_name, 'tuned'))} | {_cell(_value(b, set_name, 'tuned_retrieval'), bold=True)} | "
            f"{_given_passages(b, set_name=set_name)} | {_cell(recall_at_k) if recall_at_k is not None else '-'} |"
        )
    kind = "BM25 and the questions' WordLlama embeddings" if dense_index(args) else "BM25 alone"
    lines += [
        "",
        f"Recall of B's index ({kind}, over the {len(split.train)} training rows' questions and answers, fused) on "
        f"the paraphrases: {_recall_text(recall)}; of BM25 alone: {_recall_text(lexical)} (the index alone, before "
        "the gate). B given passages: the questions that passed B's gate; B recall: the share of questions whose "
        f"own passage was among the {k} in the prompt, a question held back by the gate counting as a miss "
        "(held-out questions have none). Training "
        "time (the training phase, manifest.json): "
        f"A {a_time:.0f} s ({a.training['steps']} steps), B {b_time:.0f} s ({b.training['steps']} steps): "
        f"**{ratio:.2f}×**.",
    ]
    differences = {title: paired(a, b, set_name) for set_name, title in SETS}
    if any(differences.values()):
        lines += [
            "",
            "B with retrieval minus A tuned, question by question (ROUGE-L; mean [95% bootstrap interval over the "
            f"questions, {BOOTSTRAP_RESAMPLES} resamples], questions better / worse by more than {PAIRED_TIE}): "
            + "; ".join(f"{title} {d.text()}" for title, d in differences.items() if d)
            + ".",
        ]
    folds, pooled = fold_rows([(a, b), *more_folds]) if more_folds else ([], None)
    fold_total = len(more_folds) + 1
    if folds:
        lines += [
            "",
            f"Held-out questions over {fold_total} disjoint folds (`--folds {fold_total}`): in fold i, the "
            f"i-th {len(split.held_out)} of the questions not reworded, in the seeded order, are held out and A and "
            "B trained again on the rest, same settings (fold 0 is the split above; the others answer only their "
            "held-out questions; each B calibrates its own gate on its training rows). ROUGE-L, and B with "
            "retrieval minus A tuned, question by question:",
            "",
            "| fold (questions) | A tuned | B tuned, no retrieval | B tuned + retrieval | B's gate | B given passages "
            "| B + retrieval − A, paired |",
            "|---|---:|---:|---:|---:|---:|---|",
            *folds,
        ]
    paraphrased = _value(b, "paraphrased", "tuned_retrieval")
    training = _value(b, "train_sample", "tuned_retrieval")
    held_b, held_a = _value(b, "validation", "tuned_retrieval"), _value(a, "validation", "tuned")
    verdicts = [
        f"ROUGE-L on paraphrases with retrieval >= {TARGET_PARAPHRASED}: "
        + _verdict(None if paraphrased is None else paraphrased >= TARGET_PARAPHRASED),
        f"on training questions >= {TARGET_TRAINING}: "
        + _verdict(None if training is None else training >= TARGET_TRAINING),
        "held-out not below A's: "
        + _verdict(None if held_b is None or held_a is None else held_b >= held_a)
        + (f" ({held.text()})" if (held := differences["held-out"]) else "")
        + (
            f"; over the {fold_total} folds' {pooled.count} questions: {_verdict(pooled.mean >= 0)} ({pooled.text()})"
            if pooled
            else ""
        ),
        f"training time <= {TARGET_TIME_RATIO}× A's: " + _verdict(ratio <= TARGET_TIME_RATIO),
        f"index recall@3 on paraphrases >= {TARGET_RECALL_AT_3}: "
        + _verdict(recall[3] >= TARGET_RECALL_AT_3 if 3 in recall else None),
    ]
    lines += ["", "Targets (issue 22; B with retrieval, as served): " + "; ".join(verdicts) + "."]
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_faq_argument(parser, default=None)
    parser.add_argument("--paraphrases", type=Path, default=PARAPHRASES, help="rewordings of FAQ questions (JSONL)")
    parser.add_argument("--epochs", type=float, default=3.0, help="epochs of both jobs (default 3)")
    parser.add_argument("--jobs-dir", type=Path, default=REPO / "runs" / "retrieval-faq")
    parser.add_argument(
        "--train-samples",
        type=int,
        default=0,
        help="training questions each model answers (default 0: all of them; a sample's mean moves by ±0.05)",
    )
    parser.add_argument(
        "--folds",
        type=int,
        default=1,
        help="disjoint held-out folds (default 1: the one split; each further fold adds two jobs that answer only "
        "their held-out questions, about 20 minutes on 2 cores)",
    )
    parser.add_argument("--recall-only", action="store_true", help="the split and the index's recall; no jobs")
    parser.add_argument("--max-steps", type=int, default=0, help="stop each job after this many steps (a smoke run)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="answer length cap (default: the image's)")
    parser.add_argument("--model-id", default="", help="base model of both jobs (default: the image's, embedded)")
    parser.add_argument(
        "--hp",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="another hyperparameter for both jobs (repeatable)",
    )
    parser.add_argument("--docs", type=Path, default=DOCS, help=argparse.SUPPRESS)  # tests write elsewhere
    parser.add_argument("--note", default="", help="a line added under the table (e.g. machine load)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    args.hp = dict(args.hp)
    if args.faq is None:
        parser.error("--faq PATH is required (scripts/fetch_faq_dataset.py downloads the FAQ CSV)")
    check_faq(args.faq)

    examples, paraphrase_pairs = load_faq(args.faq), read_paraphrases(args.paraphrases)
    if not 1 <= args.folds <= (available := fold_count(examples, paraphrase_pairs)):
        parser.error(f"--folds {args.folds}: the FAQ's questions not reworded make 1 to {available} folds")
    split = split_faq(examples, paraphrase_pairs)
    train, held_out, paraphrased = len(split.train), len(split.held_out), len(split.paraphrased)
    print(f"split: {train} training rows, {held_out} held out, {paraphrased} paraphrased", flush=True)
    queries = [e.question for e in split.paraphrased]
    recall = index_recall(split.train, queries, split.originals, dense=dense_index(args))
    lexical = index_recall(split.train, queries, split.originals, dense=False)
    print(f"index recall on the paraphrases: {_recall_text(recall)} (BM25 alone: {_recall_text(lexical)})", flush=True)
    if args.recall_only:
        return 0

    results = run_jobs(args.jobs_dir, job_hyperparameters(split, args), split)
    more_folds = []
    for fold in range(1, args.folds):
        fold_split = split_faq(examples, paraphrase_pairs, fold=fold)
        jobs = run_jobs(args.jobs_dir / f"fold-{fold}", fold_hyperparameters(fold_split, args), fold_split, fold)
        more_folds.append((jobs["A"], jobs["B"]))
    markdown = table(results["A"], results["B"], recall, lexical, split, args, more_folds)
    print("\n" + markdown)
    if not args.no_write:
        write_section(DOCS_SECTION, markdown, args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
