#!/usr/bin/env python3
"""Download the Amazon SageMaker FAQ dataset the reference project fine-tuned on (154 Q/A pairs, MIT-0).

    .venv/bin/python scripts/fetch_faq_dataset.py                 # -> data/Amazon_SageMaker_FAQs.csv
    .venv/bin/python scripts/fetch_faq_dataset.py --region eu-west-1 --output /tmp/faq.csv
    make demo DEMO_ARGS="--data data/Amazon_SageMaker_FAQs.csv"

Sources, tried in order: the public SageMaker JumpStart bucket of your region (where the reference notebook
read it), then the aws-samples repository on GitHub (a byte-identical copy). The file is checked against
its known SHA-256 and parsed before it is kept; nothing half-downloaded is left behind. The file has no
header row, a byte-order mark and CRLF line ends: the training image reads it as it is.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILE_NAME = "Amazon_SageMaker_FAQs.csv"
SHA256 = "a2e5c5880e5669bf218ecb5ad722117b78900f6c98814699dfbf986b4567996e"
JUMPSTART_URL = (
    "https://jumpstart-cache-prod-{region}.s3.{region}.amazonaws.com/"
    "training-datasets/Amazon_SageMaker_FAQs/" + FILE_NAME
)
GITHUB_URL = (
    "https://raw.githubusercontent.com/aws-samples/multi-tenant-chatbot-using-rag-with-amazon-bedrock/"
    "main/data/" + FILE_NAME
)


def sources(region: str, url: str | None) -> list[str]:
    return [url] if url else [JUMPSTART_URL.format(region=region), GITHUB_URL]


def download(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--region",
        default=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        help="JumpStart bucket region (default: AWS_REGION or us-east-1)",
    )
    parser.add_argument("--output", type=Path, default=REPO / "data" / FILE_NAME, help="where to write the CSV")
    parser.add_argument("--url", help="download from this URL instead (a mirror); the checksum still applies")
    parser.add_argument("--no-verify", action="store_true", help="accept a file whose checksum differs")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)

    errors = []
    for url in sources(args.region, args.url):
        print(f"downloading {url}", flush=True)
        try:
            content = download(url, args.timeout)
        except (urllib.error.URLError, OSError) as e:
            errors.append(f"{url}: {e}")
            continue
        digest = hashlib.sha256(content).hexdigest()
        if digest != SHA256 and not args.no_verify:
            errors.append(f"{url}: SHA-256 {digest} is not the known {SHA256} (use --no-verify to keep it)")
            continue
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=args.output.parent, delete=False, suffix=".part") as tmp:
            tmp.write(content)
        rows = _count_rows(Path(tmp.name))
        os.replace(tmp.name, args.output)
        print(f"wrote {args.output} ({len(content)} bytes, {rows} question/answer rows)")
        return 0
    print("error: could not download the dataset:\n  " + "\n  ".join(errors), file=sys.stderr)
    return 1


def _count_rows(path: Path) -> int:
    import csv

    with path.open(encoding="utf-8-sig", newline="") as f:
        return sum(1 for row in csv.reader(f) if row)


if __name__ == "__main__":
    sys.exit(main())
