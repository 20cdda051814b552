"""What the benchmark scripts share: where results are written, and how this machine is described."""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"


def write_section(name: str, text: str, docs: Path = DOCS) -> None:
    """Replace what stands between `<!-- BEGIN name -->` and `<!-- END name -->` in `docs` with `text`."""
    content = docs.read_text(encoding="utf-8")
    pattern = re.compile(rf"(<!-- BEGIN {re.escape(name)} -->\n)(?:.*?\n)?(<!-- END {re.escape(name)} -->)", re.S)
    if not pattern.search(content):
        raise SystemExit(f"{docs} has no <!-- BEGIN {name} --> ... <!-- END {name} --> section")
    section = text.strip("\n") + "\n"
    docs.write_text(pattern.sub(lambda m: m.group(1) + section + m.group(2), content), encoding="utf-8")
    print(f"wrote the {name} section of {docs.relative_to(REPO) if docs.is_relative_to(REPO) else docs}")


def machine() -> str:
    """Cores, CPU model, memory and Python: the line each result names its machine by."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
        platform.processor() or "unknown CPU",
    )
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {memory_gib:.0f} GiB, Python {platform.python_version()}"


def with_gguf(model_dir: Path, quantization: str, work: Path) -> Path:
    """A copy of the artifact `model_dir` (its files and folders linked, not copied: weights, tokenizer, retrieval
    index) with the GGUF the training image writes for `quantization` (trainer.gguf_export), named in its
    manifest.json; the entry also records `export_s`."""
    from trainer import gguf_export

    target = work / f"model-{quantization}"
    target.mkdir()
    for path in model_dir.iterdir():
        if path.suffix != ".gguf" and path.name != "manifest.json":
            (target / path.name).symlink_to(path.resolve())
    started = time.perf_counter()
    entry = gguf_export.export(target, quantization)
    if entry is None:
        raise SystemExit(f"could not write a {quantization} GGUF of {model_dir} (see the log above)")
    entry["export_s"] = time.perf_counter() - started
    manifest_path = model_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    (target / "manifest.json").write_text(json.dumps({**manifest, "gguf": entry}))
    return target
