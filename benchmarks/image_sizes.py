"""Record the images' sizes in docs/benchmarks.md (section `images`), next to their base and heaviest layers.

    python benchmarks/image_sizes.py [--write] [IMAGE ...]     (default: the two images build-images.sh makes)

Sizes are what `docker image inspect` reports (uncompressed, on disk), with the part the project adds on top
of the base shown separately: the base is the user's choice (the 13 GB CUDA devel base vs a CI stand-in),
the added layers are ours. A size is not a timing, so a busy machine does not change it.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

from common import write_section

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ["sagemaker-llm-finetune-train:local", "sagemaker-llm-finetune-serve:local"]
BASE_KEY_LABEL = "org.sagemaker-llm-finetune.base-key"


def docker_json(*args: str):
    out = subprocess.run(["docker", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def layers(image: str) -> list[dict]:
    """Image history, oldest first: {size, created_by}."""
    out = subprocess.run(
        ["docker", "history", "--no-trunc", "--human=false", "--format", "{{json .}}", image],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rows = [json.loads(line) for line in out.splitlines()][::-1]
    return [{"size": int(r["Size"]), "created_by": r["CreatedBy"]} for r in rows]


def base_of(image: str) -> tuple[str, int]:
    """The base the image was built FROM and its size, found as the longest image whose layers prefix ours."""
    ours = docker_json("image", "inspect", image)[0]["RootFS"]["Layers"]
    best = ("(unknown)", 0, 0)
    for ref in subprocess.run(
        ["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split():
        if ref == image or ref.endswith(":<none>"):
            continue
        info = docker_json("image", "inspect", ref)[0]
        theirs = info["RootFS"]["Layers"]
        if len(theirs) < len(ours) and ours[: len(theirs)] == theirs and len(theirs) > best[2]:
            best = (ref, info["Size"], len(theirs))
    return best[0], best[1]


def describe(step: str) -> str:
    step = re.sub(r"^\|\d+ \S+=\S+ ", "", step.replace("/bin/sh -c ", "")).replace(" # buildkit", "")
    if "requirements.txt" in step and "pip-install" in step:
        return "Python dependencies (requirements.txt)"
    if "import torch" in step and "wheelhouse" in step:
        return "torch (from the base, a local wheel, or PyPI)"
    if "g++" in step:
        return "g++ and Python headers for DeepSpeed's JIT ops"
    return step[:60]


def measure(image: str) -> dict:
    info = docker_json("image", "inspect", image)[0]
    base, base_size = base_of(image)
    history = layers(image)
    ours = history[len(layers(base)) :] if base_size else history
    heavy = sorted((layer for layer in ours if layer["size"] > 1_000_000), key=lambda x: -x["size"])
    return {
        "image": image,
        "size": info["Size"],
        "base": base,
        "base_size": base_size,
        "added": info["Size"] - base_size,
        "heaviest": [(describe(x["created_by"]), x["size"]) for x in heavy],
    }


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def shared_size(a: str, b: str) -> int:
    """Bytes two images share on disk: their common oldest layers (the base, and torch on the same base)."""
    shared = 0
    # Metadata-only steps (LABEL, ENV: 0 bytes) differ between the images without making layers; skip them.
    for x, y in zip(*([r for r in layers(i) if r["size"]] for i in (a, b)), strict=False):
        if x != y:
            break
        shared += x["size"]
    return shared


def render(rows: list[dict], engine: str, shared: int | None) -> str:
    lines = [
        f"Measured with `python benchmarks/image_sizes.py --write` on Docker {engine}; sizes are "
        "uncompressed, "
        "as `docker image inspect` reports them. CI builds on the local stand-in base (Debian bookworm + "
        "Python 3.11, CPU torch wheel); on the default CUDA bases torch comes with the base instead. "
        "Those bases cannot be pulled here (no registry), so images on them are not measured.",
        "",
        "| image | size | base | base size | added by us | heaviest added layers |",
        "|---|---:|---|---:|---:|---|",
    ]
    for r in rows:
        heavy = "; ".join(f"{name} {gb(size)}" for name, size in r["heaviest"][:3])
        lines.append(
            f"| `{r['image']}` | {gb(r['size'])} | `{r['base']}` | {gb(r['base_size'])} | {gb(r['added'])} | {heavy} |"
        )
    if shared is not None:
        both = sum(r["size"] for r in rows) - shared
        lines += [
            "",
            f"Both images together take {gb(both)} on disk: they share {gb(shared)} of layers "
            "(the base and the torch layer, one instruction in both Dockerfiles).",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", default=DEFAULT_IMAGES)
    parser.add_argument("--write", action="store_true", help="rewrite the images section of docs/benchmarks.md")
    args = parser.parse_args()
    engine = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"], check=True, capture_output=True, text=True
    ).stdout.strip()
    shared = shared_size(*args.images) if len(args.images) == 2 else None
    text = render([measure(image) for image in args.images], engine, shared)
    print(text)
    if args.write:
        write_section("images", text)


if __name__ == "__main__":
    main()
