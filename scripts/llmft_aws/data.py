"""Upload a local dataset (CSV, JSONL or Parquet) to S3 as the training job's `train` and `validation` channels.

    scripts/llmft-aws upload-data --data data/faq.csv --s3-uri s3://BUCKET/datasets/faq [--validation-fraction 0.1]
    scripts/llmft-aws upload-data --faq --s3-uri s3://BUCKET/datasets/faq     # fetch the public FAQ data first

The split is row-level and seeded, so a re-run writes the same two files; a file whose MD5 matches the one
recorded on the object in S3 is not uploaded again. Rows keep their format (a CSV header row stays on both
halves). Prints the two channel URIs on stdout, ready for `train --train ... --validation ...`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from llmft_aws.context import AwsContext, CommandError, UsageError, log

SUFFIXES = (".csv", ".jsonl", ".parquet")
MD5_METADATA = "llmft-md5"  # x-amz-meta-llmft-md5: what a re-run compares to skip unchanged files
HEADER_WORDS = {"question", "answer", "prompt", "response", "instruction", "output", "completion", "input"}


@dataclass(frozen=True)
class Split:
    train: bytes
    validation: bytes
    train_rows: int
    validation_rows: int


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or len(uri) <= 5:
        raise UsageError(f"{uri!r} is not an S3 URI (s3://bucket/prefix)")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise UsageError(f"{uri!r} names no bucket")
    return bucket, key.strip("/")


def split_rows(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices for train and validation; at least one row each when there are two or more rows."""
    if not 0 < fraction < 1:
        raise UsageError(f"--validation-fraction must be between 0 and 1, got {fraction}")
    if n < 2:
        raise UsageError(f"the dataset has {n} row(s): at least 2 are needed for a validation split")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_validation = min(n - 1, max(1, round(n * fraction)))
    return sorted(order[n_validation:]), sorted(order[:n_validation])


def _split_csv(raw: bytes, fraction: float, seed: int) -> Split:
    text = raw.decode("utf-8-sig")  # the FAQ file starts with a byte-order mark
    rows = list(csv.reader(io.StringIO(text)))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    header = rows[:1] if rows and {c.strip().lower() for c in rows[0]} & HEADER_WORDS else []
    body = rows[len(header) :]
    train_idx, val_idx = split_rows(len(body), fraction, seed)

    def encode(indices):
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(header + [body[i] for i in indices])
        return out.getvalue().encode()

    return Split(encode(train_idx), encode(val_idx), len(train_idx), len(val_idx))


def _split_jsonl(raw: bytes, fraction: float, seed: int) -> Split:
    lines = [line for line in raw.decode("utf-8").splitlines() if line.strip()]
    for number, line in enumerate(lines, 1):
        try:
            json.loads(line)
        except ValueError as e:
            raise UsageError(f"line {number} is not JSON: {e}") from e
    train_idx, val_idx = split_rows(len(lines), fraction, seed)

    def encode(indices):
        return "".join(lines[i] + "\n" for i in indices).encode()

    return Split(encode(train_idx), encode(val_idx), len(train_idx), len(val_idx))


def _split_parquet(path: Path, fraction: float, seed: int) -> Split:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    train_idx, val_idx = split_rows(table.num_rows, fraction, seed)

    def encode(indices):
        out = io.BytesIO()
        pq.write_table(table.take(indices), out)
        return out.getvalue()

    return Split(encode(train_idx), encode(val_idx), len(train_idx), len(val_idx))


def split_dataset(path: Path, fraction: float, seed: int) -> Split:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    if suffix == ".parquet":
        return _split_parquet(path, fraction, seed)
    raw = path.read_bytes()
    return _split_csv(raw, fraction, seed) if suffix == ".csv" else _split_jsonl(raw, fraction, seed)


def put_if_changed(ctx: AwsContext, s3, bucket: str, key: str, body: bytes, **extra) -> None:
    md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
    if not ctx.dry_run:
        try:
            # Our own MD5 in the object's metadata: under SSE-KMS the ETag is not the MD5 of the bytes.
            if s3.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get(MD5_METADATA) == md5:
                log(f"s3://{bucket}/{key} is unchanged: not uploaded again")
                return
        except s3.exceptions.ClientError as e:
            if e.response["Error"]["Code"] not in ("404", "NoSuchKey", "NotFound"):
                raise CommandError(f"cannot read s3://{bucket}/{key}: {e}") from e
    log(f"uploading s3://{bucket}/{key} ({len(body)} bytes)")
    # No ServerSideEncryption here: the bucket's default applies (SSE-KMS for data, SSE-S3 for the web bucket,
    # in infra/template.yaml), and S3 encrypts every new object at least with SSE-S3 anyway.
    s3.put_object(
        Bucket=bucket,
        Key=key,
        Body=body if not ctx.dry_run else f"<{len(body)} bytes>",
        Metadata={MD5_METADATA: md5},
        **extra,
    )


def upload(ctx: AwsContext, data: Path, s3_uri: str, fraction: float, seed: int) -> dict[str, str]:
    bucket, prefix = parse_s3_uri(s3_uri)
    split = split_dataset(data, fraction, seed)
    log(f"{data}: {split.train_rows} training rows, {split.validation_rows} validation rows (seed {seed})")
    s3 = ctx.client("s3")
    channels = {}
    for channel, body in (("train", split.train), ("validation", split.validation)):
        key = "/".join(p for p in (prefix, channel, data.stem + data.suffix.lower()) if p)
        put_if_changed(ctx, s3, bucket, key, body)
        channels[channel] = f"s3://{bucket}/{key.rsplit('/', 1)[0]}/"
    return channels


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="local dataset: .csv (question,answer), .jsonl or .parquet")
    source.add_argument(
        "--faq",
        action="store_true",
        help="fetch the public Amazon SageMaker FAQ dataset (scripts/fetch_faq_dataset.py) and use it",
    )
    parser.add_argument(
        "--s3-uri", required=True, help="S3 prefix; channels go to PREFIX/train/ and PREFIX/validation/"
    )
    parser.add_argument("--validation-fraction", type=float, default=0.1, help="share of rows held out (default 0.1)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the row shuffle (same seed, same split)")


def run(ctx: AwsContext, args) -> int:
    data = args.data
    if args.faq:
        import fetch_faq_dataset  # scripts/ is on sys.path: the project's own downloader, checksum included

        data = fetch_faq_dataset.REPO / "data" / fetch_faq_dataset.FILE_NAME
        if not data.exists() and ctx.dry_run:
            print(
                f"[dry-run] download the FAQ dataset to {data} (scripts/fetch_faq_dataset.py), then split and "
                f"upload it under {args.s3_uri}/train/ and /validation/"
            )
            return 0
        if not data.exists() and fetch_faq_dataset.main(["--region", ctx.region, "--output", str(data)]) != 0:
            raise CommandError("could not fetch the FAQ dataset (see the messages above)")
    for channel, uri in upload(ctx, data, args.s3_uri, args.validation_fraction, args.seed).items():
        print(f"{channel}={uri}")
    return 0
