"""The local S3 stand-in: run it, wait for it, and move data and model artifacts through it.

    python -m s3_standin serve --data-dir .local/s3 --port 8333          # SeaweedFS, objects on disk
    export AWS_ENDPOINT_URL_S3=http://127.0.0.1:8333 AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local
    # (the key pair the server accepts: --access-key/--secret-key, default local/local)
    python -m s3_standin wait --timeout 60 [--data-dir .local/s3]       # exit 0 once it serves
    python -m s3_standin seed --bucket sagemaker-local --dataset data.csv [--model DIR_OR_TAR]
    python -m s3_standin upload-model runs/model s3://sagemaker-local/models/tuned/model.tar.gz
    python -m s3_standin fetch-model s3://sagemaker-local/models/tuned/model.tar.gz /opt/ml/model
    python -m s3_standin upload FILE s3://bucket/key | download s3://bucket/key FILE

Everything but `serve` and `wait` is plain boto3 and works unchanged against AWS S3.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger("s3_standin")


def make_parser(env: dict[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m s3_standin", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the S3-compatible server (SeaweedFS) in the foreground")
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=Path(env.get("S3_STANDIN_DATA_DIR", ".local/s3")),
        help="where objects are stored; survives restarts [S3_STANDIN_DATA_DIR]",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=int(env.get("S3_STANDIN_PORT", "8333")),
        help="S3 API port (default 8333) [S3_STANDIN_PORT]",
    )
    serve.add_argument(
        "--access-key",
        default=env.get("S3_STANDIN_ACCESS_KEY", "local"),
        help="the access key clients must sign with (default local) [S3_STANDIN_ACCESS_KEY]",
    )
    serve.add_argument(
        "--secret-key",
        default=env.get("S3_STANDIN_SECRET_KEY", "local"),
        help="its secret key (default local) [S3_STANDIN_SECRET_KEY]",
    )
    serve.add_argument(
        "--host",
        default=env.get("S3_STANDIN_HOST", "127.0.0.1"),
        help="interface for the S3 port; 0.0.0.0 inside a container (the internal ports stay on loopback) "
        "[S3_STANDIN_HOST]",
    )

    wait = commands.add_parser("wait", help="wait until the S3 endpoint answers (a compose health check)")
    wait.add_argument(
        "--endpoint-url",
        default=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
        help="default: AWS_ENDPOINT_URL_S3",
    )
    wait.add_argument("--timeout", type=float, default=60.0)
    wait.add_argument(
        "--data-dir",
        type=Path,
        default=Path(env["S3_STANDIN_DATA_DIR"]) if env.get("S3_STANDIN_DATA_DIR") else None,
        help="the server's data directory, when local: also wait until every stored volume is back "
        "online after a restart [S3_STANDIN_DATA_DIR]",
    )

    seed = commands.add_parser("seed", help="create the bucket and upload the dataset (and a model artifact)")
    seed.add_argument("--bucket", required=True)
    seed.add_argument("--dataset", type=Path, action="append", default=[], help="a dataset file to upload; repeatable")
    seed.add_argument("--dataset-prefix", default="datasets/", help="key prefix for datasets")
    seed.add_argument("--model", type=Path, help="a model directory (packed as model.tar.gz) or a .tar.gz")
    seed.add_argument("--model-key", default="models/base/model.tar.gz")

    upload = commands.add_parser("upload", help="upload one file")
    upload.add_argument("path", type=Path)
    upload.add_argument("uri")
    download = commands.add_parser("download", help="download one object")
    download.add_argument("uri")
    download.add_argument("path", type=Path)
    upload_model = commands.add_parser("upload-model", help="pack a model directory as model.tar.gz and upload")
    upload_model.add_argument("model_dir", type=Path)
    upload_model.add_argument("uri")
    fetch_model = commands.add_parser("fetch-model", help="download a model.tar.gz and unpack it into a directory")
    fetch_model.add_argument("uri")
    fetch_model.add_argument("dest", type=Path)
    return parser


def wait_until_up(endpoint_url: str | None, timeout: float, data_dir: Path | None = None) -> bool:
    """True once the endpoint answers HTTP at all (no credentials needed, unlike a boto3 call) and, given
    the data directory, once every volume stored there is online again."""
    if not endpoint_url:
        raise SystemExit("error: no endpoint: pass --endpoint-url or set AWS_ENDPOINT_URL_S3")
    deadline = time.monotonic() + timeout
    if not _wait_http(endpoint_url, deadline):
        return False
    if data_dir is None:
        return True
    from .server import volumes_on_disk, volumes_registered

    while (volumes_registered(data_dir) or 0) < volumes_on_disk(data_dir):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)
    return True


def _wait_http(endpoint_url: str, deadline: float) -> bool:
    while True:
        try:
            with urllib.request.urlopen(endpoint_url, timeout=2):
                return True
        except urllib.error.HTTPError as exc:  # 403 and friends: the server is up, just strict
            if exc.code < 500:
                return True
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)


def seed(s3, args: argparse.Namespace) -> dict:
    from .transfer import ensure_bucket, upload_file, upload_model

    ensure_bucket(s3, args.bucket)
    summary: dict = {"bucket": args.bucket, "datasets": []}
    prefix = args.dataset_prefix.strip("/") + "/" if args.dataset_prefix.strip("/") else ""
    for dataset in args.dataset:
        uri = f"s3://{args.bucket}/{prefix}{dataset.name}"
        upload_file(s3, dataset, uri)
        summary["datasets"].append(uri)
    if args.model:
        uri = f"s3://{args.bucket}/{args.model_key.lstrip('/')}"
        if args.model.is_dir():
            upload_model(s3, args.model, uri)
        else:
            upload_file(s3, args.model, uri)
        summary["model"] = uri
    return summary


def main(argv: list[str] | None = None) -> int:
    env = dict(os.environ)
    args = make_parser(env).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("botocore").setLevel(logging.WARNING)

    if args.command == "serve":
        from .server import S3ServerConfig, WeedNotFound, serve

        try:
            return serve(
                S3ServerConfig(
                    data_dir=args.data_dir.resolve(),
                    port=args.port,
                    host=args.host,
                    access_key=args.access_key,
                    secret_key=args.secret_key,
                )
            )  # on loopback serve() execs weed and never returns
        except WeedNotFound as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.command == "wait":
        if wait_until_up(args.endpoint_url, args.timeout, args.data_dir):
            return 0
        print(
            f"error: no S3 endpoint answered at {args.endpoint_url} within {args.timeout:g} s",
            file=sys.stderr,
        )
        return 1

    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    from . import transfer

    s3 = transfer.make_client()
    try:
        if args.command == "seed":
            print(json.dumps(seed(s3, args)))
        elif args.command == "upload":
            transfer.upload_file(s3, args.path, args.uri)
        elif args.command == "download":
            transfer.download_file(s3, args.uri, args.path)
        elif args.command == "upload-model":
            transfer.upload_model(s3, args.model_dir, args.uri)
        elif args.command == "fetch-model":
            transfer.fetch_model(s3, args.uri, args.dest)
    except NoCredentialsError:
        print(
            "error: no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(any values work against the local S3 stand-in)",
            file=sys.stderr,
        )
        return 2
    except transfer.TransferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ClientError, BotoCoreError) as exc:
        status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        hint = (
            " (check that AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY match the key pair the S3 server accepts)"
            if status == 403
            else ""
        )
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
