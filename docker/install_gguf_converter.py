#!/usr/bin/env python3
"""Install llama.cpp's HF-to-GGUF converter from a pinned source: the llama-cpp-python sdist on PyPI.

    python docker/install_gguf_converter.py                 # into <this python's prefix>/share/llama.cpp/
    python docker/install_gguf_converter.py --dest DIR --sdist llama_cpp_python-0.3.36.tar.gz

llama.cpp publishes its converter (convert_hf_to_gguf.py, with its conversion/ and gguf-py/ folders) in its git
repository, not as a package; llama-cpp-python's sdist vendors one llama.cpp commit, so a pinned, hashed sdist
from PyPI pins the converter, and the same sdist builds the llama.cpp the serving image runs. The files are
checked against the sdist's sha256 and written with SOURCE.json (version, hash, files); the training image's
trainer.gguf_export runs them. The converter imports torch, transformers, numpy and sentencepiece: the training
requirements have them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import ssl
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDORED = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
# What the converter needs of the vendored tree (gguf-py: the converter puts its own copy first on sys.path).
MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE")


def default_dest() -> Path:
    return Path(sys.prefix) / "share" / "llama.cpp"


def download(directory: Path) -> Path:
    """The sdist from the package index's simple API (PEP 691 JSON: PIP_INDEX_URL, else PyPI), trusting PIP_CERT
    (or REQUESTS_CA_BUNDLE, SSL_CERT_FILE) as pip would. Why not `pip download`: for an sdist it prepares the
    metadata, which installs the build backend (cmake, ninja) first, to extract a few Python files."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    cafile = next(
        (os.environ[k] for k in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE") if os.environ.get(k)), None
    )
    context = ssl.create_default_context(cafile=cafile)
    request = urllib.request.Request(f"{index}/{PACKAGE}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, context=context, timeout=60) as response:
        files = json.load(response)["files"]
    entry = next((f for f in files if f["filename"] == SDIST), None)
    if entry is None:
        raise SystemExit(f"{index}/{PACKAGE}/ lists no {SDIST}; download it and pass --sdist")
    target = directory / SDIST
    url = urllib.parse.urljoin(f"{index}/{PACKAGE}/", entry["url"])
    with urllib.request.urlopen(url, context=context, timeout=300) as response, target.open("wb") as out:
        shutil.copyfileobj(response, out)
    return target


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def extract(sdist: Path, dest: Path) -> list[str]:
    """The converter's files from the sdist into `dest` (replaced whole); the relative paths written."""
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    written = []
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            if not member.name.startswith(VENDORED) or not member.isfile():
                continue
            relative = member.name[len(VENDORED) :]
            if not any(relative == m or (m.endswith("/") and relative.startswith(m)) for m in MEMBERS):
                continue
            if "/__pycache__/" in relative:
                continue
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.extractfile(member) as source, target.open("wb") as out:
                shutil.copyfileobj(source, out)
            written.append(relative)
    if "convert_hf_to_gguf.py" not in written:
        raise SystemExit(f"{sdist} has no {VENDORED}convert_hf_to_gguf.py")
    (staging / "SOURCE.json").write_text(
        json.dumps(
            {
                "source": f"{PACKAGE} {VERSION} sdist from PyPI, vendor/llama.cpp/",
                "sdist_sha256": SDIST_SHA256,
                "files": len(written),
            },
            indent=2,
        )
        + "\n"
    )
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(dest)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=default_dest(), help="default: <prefix>/share/llama.cpp")
    parser.add_argument("--sdist", type=Path, help=f"a downloaded {SDIST} (default: fetched from the index)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or download(Path(tmp))
        digest = sha256(sdist)
        if digest != SDIST_SHA256:
            raise SystemExit(f"{sdist}: sha256 {digest}, expected {SDIST_SHA256} ({PACKAGE} {VERSION})")
        written = extract(sdist, args.dest)
    print(f"llama.cpp converter ({PACKAGE} {VERSION}, {len(written)} files) in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
