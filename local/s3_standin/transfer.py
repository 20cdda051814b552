"""Move datasets and model artifacts through S3 with plain boto3, the way SageMaker does around a job.

Nothing here knows it talks to a stand-in: the endpoint comes from boto3's own configuration
(AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, or a profile), so the same calls work against AWS.

    pack_model(dir) -> model.tar.gz   what SageMaker does with /opt/ml/model after training
    fetch_model(uri, dir)             what SageMaker does before a serving container starts
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger("s3_standin")

# The model artifact SageMaker writes and reads: a gzipped tar with the model files at its root.
MODEL_ARCHIVE_NAME = "model.tar.gz"


class TransferError(RuntimeError):
    """A data move failed for a reason the user can act on; the message says which."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise TransferError(f"expected an s3://bucket/key URI, got {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def make_client():
    """A plain boto3 S3 client; path-style addressing so compose host names work as endpoints."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 5})
    )


class _Progress:
    """Logs every 10 % of a large transfer, so a multi-GB artifact shows it is moving."""

    def __init__(self, verb: str, uri: str, total: int):
        self.verb, self.uri, self.total = verb, uri, total
        self.done, self.next_mark = 0, 10
        self.lock = threading.Lock()

    def __call__(self, amount: int) -> None:
        with self.lock:
            self.done += amount
            if self.total >= (64 << 20):
                percent = self.done * 100 // max(self.total, 1)
                while percent >= self.next_mark <= 100:
                    log.info(f"{self.verb} {self.uri}: {self.next_mark} %")
                    self.next_mark += 10


def _client_error_code(exc: Exception) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "")


def ensure_bucket(s3, bucket: str) -> bool:
    """Create `bucket` unless it exists; True when it was created."""
    try:
        s3.head_bucket(Bucket=bucket)
        return False
    except Exception as exc:
        if _client_error_code(exc) not in {"404", "NoSuchBucket", "NotFound"}:
            raise
    try:
        s3.create_bucket(Bucket=bucket)
    except Exception as exc:
        if _client_error_code(exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
            raise
        return False
    log.info(f"created bucket s3://{bucket}")
    return True


def upload_file(s3, path: str | Path, uri: str) -> None:
    path = Path(path)
    if not path.is_file():
        raise TransferError(f"{path} is not a file")
    bucket, key = parse_s3_uri(uri)
    size, started = path.stat().st_size, time.perf_counter()
    s3.upload_file(str(path), bucket, key, Callback=_Progress("uploading", uri, size))
    log.info(f"uploaded {path} ({_mb(size)}) to {uri} in {time.perf_counter() - started:.1f} s")


def download_file(s3, uri: str, path: str | Path) -> Path:
    bucket, key = parse_s3_uri(uri)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        size = s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
    except Exception as exc:
        if _client_error_code(exc) in {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}:
            raise TransferError(f"{uri} does not exist") from exc
        raise
    started = time.perf_counter()
    # Download beside the target and rename: a crash never leaves a truncated file under the real name.
    partial = path.with_name(path.name + ".partial")
    s3.download_file(bucket, key, str(partial), Callback=_Progress("downloading", uri, size))
    os.replace(partial, path)
    log.info(f"downloaded {uri} ({_mb(size)}) to {path} in {time.perf_counter() - started:.1f} s")
    return path


def pack_model(model_dir: str | Path, archive: str | Path) -> Path:
    """Tar and gzip the contents of `model_dir` with the files at the archive root, as SageMaker does."""
    model_dir, archive = Path(model_dir), Path(archive)
    if not model_dir.is_dir() or not any(model_dir.iterdir()):
        raise TransferError(f"{model_dir} is not a directory with model files in it")
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:  # weights barely compress; save the CPU
        for child in sorted(model_dir.iterdir()):
            tar.add(child, arcname=child.name)
    return archive


def upload_model(s3, model_dir: str | Path, uri: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        upload_file(s3, pack_model(model_dir, Path(tmp) / MODEL_ARCHIVE_NAME), uri)


def extract_model(archive: str | Path, dest: str | Path) -> Path:
    """Unpack a model.tar.gz refusing absolute paths, '..', links out of the tree and device files. It is
    unpacked into a staging folder beside `dest`, then moved in place: a truncated or corrupt archive is an error
    that leaves `dest` as it was (an empty `dest` is replaced; a non-empty one gets the files added)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    staging.chmod(0o755)  # mkdtemp makes it 0700: the serving container's unprivileged user must read the model
    try:
        with tarfile.open(archive, "r:gz") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(staging, filter="data")
            else:  # Python < 3.11.4 (Debian 12's 3.11.2) has no extraction filters: check each member ourselves
                tar.extractall(staging, members=_checked_members(tar, staging))
        _move_into(staging, dest)
    except (getattr(tarfile, "FilterError", TransferError), tarfile.ReadError) as exc:
        raise TransferError(f"refusing to unpack {archive}: {exc}") from exc
    except (EOFError, zlib.error, tarfile.TarError) as exc:
        raise TransferError(f"{archive} is truncated or corrupt ({exc}); nothing was unpacked") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _move_into(staging: Path, dest: Path) -> None:
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    if not dest.exists():
        os.replace(staging, dest)
        return
    for entry in staging.iterdir():
        os.replace(entry, dest / entry.name)


def _checked_members(tar: tarfile.TarFile, dest: Path):
    """What the "data" filter refuses, for the cases a model archive can hit: paths out of the tree, links
    pointing out of it, device files."""
    root = dest.resolve()
    for member in tar.getmembers():
        target = (root / member.name).resolve()
        if member.name.startswith("/") or not target.is_relative_to(root):
            raise TransferError(f"member {member.name!r} would land outside {dest}")
        if member.isdev():
            raise TransferError(f"member {member.name!r} is a device file")
        if member.issym() or member.islnk():
            base = root if member.islnk() else target.parent
            if member.linkname.startswith("/") or not (base / member.linkname).resolve().is_relative_to(root):
                raise TransferError(f"member {member.name!r} links outside {dest}")
        yield member


def fetch_model(s3, uri: str, dest: str | Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        archive = download_file(s3, uri, Path(tmp) / MODEL_ARCHIVE_NAME)
        return extract_model(archive, dest)


def _mb(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"
