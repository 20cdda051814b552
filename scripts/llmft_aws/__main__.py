"""llmft-aws: the reference project's notebook and console steps, one command each, safe to re-run.

    scripts/llmft-aws push-images                      # ECR repositories, docker login, content-tagged push
    scripts/llmft-aws upload-data --faq --s3-uri s3://BUCKET/datasets/faq
    scripts/llmft-aws train --image URI --train s3://... --output s3://...  [--local]
    scripts/llmft-aws package-base --image URI --model MODEL_ID --s3-uri s3://.../base/   # the A/B base variant
    scripts/llmft-aws deploy --endpoint NAME --image URI --model-data s3://.../model.tar.gz [--variant ...] [--local]
    scripts/llmft-aws deploy --endpoint NAME --engine tgi|lmi --model-data s3://...   # on AWS's TGI / LMI images
    scripts/llmft-aws shift-traffic --endpoint NAME --weight tuned=50 --weight base=50
    scripts/llmft-aws evaluate --endpoint NAME --data validation.csv
    scripts/llmft-aws publish-web --stack STACK          # the chat page to the stack's bucket + CloudFront
    scripts/llmft-aws delete --endpoint NAME

Every command takes --region, --profile and --dry-run (print the API calls, send nothing). Exit codes:
0 done, 1 failed in AWS or Docker (the message says where), 2 bad arguments or missing credentials, region or
role (nothing was changed). Progress goes to stderr; results (URIs, names) to stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmft_aws import context
from llmft_aws.context import EXIT_FAILED, EXIT_USAGE, CommandError, UsageError
from llmft_aws.endpoint import ENGINES


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--region", help="AWS region (default: AWS_REGION / AWS_DEFAULT_REGION / profile)")
    parser.add_argument("--profile", help="AWS profile (default: AWS_PROFILE or the default chain)")
    parser.add_argument("--dry-run", action="store_true", help="print the API calls it would make; send nothing")


def _deploy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", required=True, help="endpoint name (lower case, digits, hyphens)")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="llmft",
        help="llmft: our serving image (default); tgi or lmi: AWS's TGI or LMI (DJL) container, same artifact",
    )
    parser.add_argument(
        "--image", help="serving image URI (from push-images; with --engine tgi|lmi: default the region's AWS image)"
    )
    parser.add_argument(
        "--model-data",
        required=True,
        help="the first variant's s3://.../model.tar.gz, or an uncompressed s3://.../prefix/ (ending in /)",
    )
    parser.add_argument("--variant-name", default="tuned", help="name of the first variant (default tuned)")
    parser.add_argument(
        "--variant",
        metavar="NAME=MODEL_DATA",
        help="a second variant for an A/B test, e.g. base=s3://.../base/model.tar.gz",
    )
    parser.add_argument("--weights", nargs="+", type=float, metavar="W", help="variant weights (default 1 or 50 50)")
    parser.add_argument(
        "--role",
        help="the endpoint's SageMaker role ARN (default: SAGEMAKER_HOSTING_ROLE_ARN, else SAGEMAKER_ROLE_ARN)",
    )
    parser.add_argument("--instance-type", default="ml.g5.xlarge", help="default ml.g5.xlarge")
    parser.add_argument("--instance-count", type=int, default=1, help="initial instances per variant")
    parser.add_argument("--min-instances", type=int, default=1, help="autoscaling minimum per variant")
    parser.add_argument("--max-instances", type=int, default=2, help="autoscaling maximum per variant")
    parser.add_argument(
        "--invocations-per-instance",
        type=float,
        default=60.0,
        help="target-tracking target, invocations per instance per minute (default 60)",
    )
    parser.add_argument(
        "--env", action="append", metavar="KEY=VALUE", help="serving container env (repeatable; wins over --engine's)"
    )
    parser.add_argument("--max-input-tokens", type=int, default=2048, help="--engine tgi: prompt cap (default 2048)")
    parser.add_argument(
        "--max-total-tokens", type=int, default=4096, help="--engine tgi|lmi: prompt + answer cap (default 4096)"
    )
    parser.add_argument("--tag", action="append", metavar="KEY=VALUE", help="resource tag (repeatable)")
    parser.add_argument("--no-wait", action="store_true", help="return once the endpoint is being created")
    parser.add_argument(
        "--local",
        action="store_true",
        help="serve our image through sagemaker-core's local mode on this machine (file:// model data)",
    )
    parser.add_argument("--port", type=int, default=8080, help="--local: loopback port (default 8080)")
    parser.add_argument("--ask", help="--local: send this question once the endpoint is up; print the answer")
    parser.add_argument(
        "--smoke-test", action="store_true", help="--local: ask one question, print the answer, stop the endpoint, exit"
    )
    parser.add_argument("--health-check-timeout", type=int, default=600, help="--local: seconds to wait for /ping")


def build_parser() -> argparse.ArgumentParser:
    from llmft_aws import base_variant, data, ecr, evaluate, training

    parser = argparse.ArgumentParser(
        prog="llmft-aws", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, module, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help_text, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        _common(sub)
        return sub

    ecr.add_arguments(command("push-images", ecr, "create ECR repositories and push both images"))
    data.add_arguments(command("upload-data", data, "split a dataset and upload train/validation channels to S3"))
    training.add_arguments(command("train", training, "run a SageMaker training job (or --local)"))
    base_variant.add_arguments(
        command("package-base", base_variant, "package the untuned base model as the A/B base variant, upload it")
    )
    from llmft_aws import endpoint

    _deploy_arguments(command("deploy", endpoint, "create or update an endpoint with one or two variants"))
    shift = command("shift-traffic", endpoint, "change the variants' traffic weights")
    shift.add_argument("--endpoint", required=True)
    shift.add_argument("--weight", action="append", required=True, metavar="VARIANT=WEIGHT")
    shift.add_argument("--no-wait", action="store_true")
    delete = command("delete", endpoint, "delete the endpoint and every config, model and scaling policy it made")
    delete.add_argument("--endpoint", required=True)
    evaluate.add_arguments(command("evaluate", evaluate, "A/B-score the variants on a validation set"))
    from llmft_aws import web

    web.add_arguments(command("publish-web", web, "upload the chat page to the stack's bucket, refresh CloudFront"))
    return parser


def _deploy_spec(args, role: str, region: str | None):
    """The DeploySpec from the flags; `region` picks AWS's image for --engine tgi|lmi (None: --local)."""
    from llmft_aws.endpoint import DeploySpec, Variant, engine_environment, engine_image, gpu_count
    from llmft_aws.training import parse_pairs

    image, environment = args.image, {}
    if args.engine != "llmft":
        if region is None:
            raise UsageError(f"--engine {args.engine} runs on SageMaker only; --local serves our image")
        image = image or engine_image(args.engine, region)
        gpus = gpu_count(args.instance_type, region)
        environment = engine_environment(args.engine, gpus, args.max_input_tokens, args.max_total_tokens)
    if not image:
        raise UsageError("--image is required: the serving image URI that push-images printed")

    models = [(args.variant_name, args.model_data)]
    if args.variant:
        name, sep, uri = args.variant.partition("=")
        if not sep:
            raise UsageError(f"--variant {args.variant!r}: use NAME=s3://.../model.tar.gz")
        models.append((name, uri))
    weights = args.weights or ([1.0] if len(models) == 1 else [50.0, 50.0])
    if len(weights) != len(models):
        raise UsageError(f"--weights has {len(weights)} values for {len(models)} variants")
    return DeploySpec(
        endpoint=args.endpoint,
        image=image,
        role=role,
        variants=tuple(Variant(n, uri, w) for (n, uri), w in zip(models, weights, strict=True)),
        instance_type=args.instance_type,
        instance_count=args.instance_count,
        min_instances=args.min_instances,
        max_instances=args.max_instances,
        invocations_per_instance=args.invocations_per_instance,
        environment={**environment, **parse_pairs(args.env, "--env")},
        tags=parse_pairs(args.tag, "--tag"),
        engine=args.engine,
    )


LOCAL_ROLE = "arn:aws:iam::111111111111:role/local-mode"  # local mode needs a role-shaped string, never uses it


def dispatch(args) -> int:
    from llmft_aws import base_variant, data, ecr, endpoint, evaluate, training

    local = getattr(args, "local", False)
    if args.command == "train":
        role = LOCAL_ROLE if local and not (args.role or "") else context.require_role(args.role, "training")
        spec = training.spec_from_args(args, role)
        ctx = None if local else context.resolve(args.region, args.profile, args.dry_run)
        print(training.train(ctx, spec))
        return 0
    if args.command == "deploy" and local:
        from llmft_aws.local_endpoint import LocalEndpoint, serve_until_interrupted

        spec = _deploy_spec(args, args.role or LOCAL_ROLE, region=None)
        root = Path(__file__).resolve().parents[2] / ".local" / "sagemaker-local"  # ignored by git
        local_endpoint = LocalEndpoint(spec, args.port, root, args.health_check_timeout)
        return serve_until_interrupted(local_endpoint, args.ask, args.smoke_test)
    if args.command == "deploy":
        role = context.require_role(args.role, "hosting")
        ctx = context.resolve(args.region, args.profile, args.dry_run)
        spec = _deploy_spec(args, role, ctx.region)
        print(endpoint.deploy(ctx, spec, wait=not args.no_wait))
        return 0
    ctx = context.resolve(args.region, args.profile, args.dry_run)
    if args.command == "push-images":
        return ecr.run(ctx, args)
    if args.command == "upload-data":
        return data.run(ctx, args)
    if args.command == "package-base":
        return base_variant.run(ctx, args)
    if args.command == "shift-traffic":
        weights = {k: _weight(v) for k, v in training.parse_pairs(args.weight, "--weight").items()}
        endpoint.shift_traffic(ctx, args.endpoint, weights, wait=not args.no_wait)
        return 0
    if args.command == "delete":
        for name in endpoint.delete(ctx, args.endpoint):
            print(name)
        return 0
    if args.command == "evaluate":
        return evaluate.run(ctx, args)
    if args.command == "publish-web":
        from llmft_aws import web

        return web.run(ctx, args)
    raise UsageError(f"unknown command {args.command}")


def _weight(value: str) -> float:
    try:
        return float(value)
    except ValueError as e:
        raise UsageError(f"--weight value {value!r} is not a number") from e


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return dispatch(args)
    except UsageError as e:
        print(f"llmft-aws {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as e:
        print(f"llmft-aws {args.command}: failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"llmft-aws {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # botocore's ClientError and friends: say which call failed, in one line, not a trace.
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(e, ClientError | BotoCoreError):
            print(f"llmft-aws {args.command}: failed: {e}", file=sys.stderr)
            return EXIT_FAILED
        raise


if __name__ == "__main__":
    sys.exit(main())
