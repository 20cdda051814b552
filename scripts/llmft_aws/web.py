"""Publish the chat page (web/) to the stack's private web bucket and refresh CloudFront.

    scripts/llmft-aws publish-web --stack llmft                 # bucket, distribution, API URL from the outputs
    scripts/llmft-aws publish-web --web-bucket B --distribution-id D [--api-base-url /api]

config.js is written from the stack's ApiBaseUrl output (the API under the page's own origin, /api), so the
page needs no manual edit. Files are uploaded with explicit content types and `Cache-Control: no-cache` (names
are not content-hashed; CloudFront revalidates with ETags); unchanged files are skipped, and one invalidation
covers the rest. Prints the page URL.
"""

from __future__ import annotations

import json
import mimetypes
from pathlib import Path

from llmft_aws.context import AwsContext, CommandError, UsageError, log
from llmft_aws.data import put_if_changed

REPO = Path(__file__).resolve().parents[2]
WEB_DIR = REPO / "web"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}


def config_js(api_base_url: str) -> bytes:
    return (
        "// Written by `scripts/llmft-aws publish-web` from the stack's outputs.\n"
        f"window.QA_CONFIG = {{\n  apiBaseUrl: {json.dumps(api_base_url)},\n}};\n"
    ).encode()


def stack_outputs(ctx: AwsContext, stack: str) -> dict[str, str]:
    if ctx.dry_run:
        return {
            "WebBucketName": f"<{stack} WebBucketName>",
            "DistributionId": f"<{stack} DistributionId>",
            "ApiBaseUrl": "/api",
            "WebUrl": f"<{stack} WebUrl>",
        }
    cfn = ctx.client("cloudformation")
    try:
        described = cfn.describe_stacks(StackName=stack)["Stacks"][0]
    except cfn.exceptions.ClientError as e:
        raise UsageError(f"no stack {stack} in {ctx.region} ({e.response['Error']['Message']})") from e
    return {o["OutputKey"]: o["OutputValue"] for o in described.get("Outputs", [])}


def publish(ctx: AwsContext, bucket: str, distribution_id: str | None, api_base_url: str, web_dir: Path) -> int:
    files = sorted(p for p in web_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if not any(p.name == "index.html" for p in files):
        raise UsageError(f"{web_dir} has no index.html")
    s3 = ctx.client("s3")
    for path in files:
        body = config_js(api_base_url) if path.name == "config.js" else path.read_bytes()
        content_type = (
            CONTENT_TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        )
        put_if_changed(ctx, s3, bucket, path.name, body, ContentType=content_type, CacheControl="no-cache")
    if distribution_id:
        log(f"invalidating CloudFront distribution {distribution_id}")
        ctx.client("cloudfront").create_invalidation(
            DistributionId=distribution_id,
            InvalidationBatch={
                "Paths": {"Quantity": 1, "Items": ["/*"]},
                "CallerReference": f"llmft-{_files_digest(files)}",
            },
        )
    return len(files)


def _files_digest(files: list[Path]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def add_arguments(parser) -> None:
    parser.add_argument("--stack", help="CloudFormation stack made from infra/template.yaml (reads its outputs)")
    parser.add_argument("--web-bucket", help="web bucket name (instead of --stack)")
    parser.add_argument("--distribution-id", help="CloudFront distribution to invalidate (instead of --stack)")
    parser.add_argument("--api-base-url", help="apiBaseUrl for config.js (default: the stack's ApiBaseUrl, /api)")
    parser.add_argument("--web-dir", type=Path, default=WEB_DIR, help="the page's files (default: web/)")


def run(ctx: AwsContext, args) -> int:
    outputs = stack_outputs(ctx, args.stack) if args.stack else {}
    bucket = args.web_bucket or outputs.get("WebBucketName")
    if not bucket:
        raise UsageError("pass --stack NAME (made from infra/template.yaml) or --web-bucket")
    api_base_url = args.api_base_url or outputs.get("ApiBaseUrl") or "/api"
    count = publish(ctx, bucket, args.distribution_id or outputs.get("DistributionId"), api_base_url, args.web_dir)
    log(f"{count} files in s3://{bucket}/ (apiBaseUrl {api_base_url})")
    if outputs.get("WebUrl"):
        print(outputs["WebUrl"])
    elif not ctx.dry_run and count == 0:
        raise CommandError("nothing was published")
    return 0
