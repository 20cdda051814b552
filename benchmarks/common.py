"""What the benchmark scripts share: where results are written, and how this machine is described."""

from __future__ import annotations

import os
import platform
import re
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
