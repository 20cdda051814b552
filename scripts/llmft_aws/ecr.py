"""Push the training and serving images to Amazon ECR, tagged with a content-based version.

    scripts/llmft-aws push-images [--images train serve] [--local-tag local] [--dry-run]

Safe to re-run: the repository is created only if missing (scan on push, immutable tags, AES-256, a lifecycle
policy), and a version already in ECR is not pushed again. The version is the content key that
scripts/build-images.sh stamps on each image (a hash of the image's build context), so the same sources give
the same tag and a changed Dockerfile gives a new one. Prints one image URI per line on stdout.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from dataclasses import dataclass

from llmft_aws.context import AwsContext, CommandError, UsageError, log

IMAGE_PREFIX = "sagemaker-llm-finetune"
CONTENT_KEY_LABEL = "org.sagemaker-llm-finetune.content-key"
IMAGES = ("train", "serve")

# Untagged layers from superseded pushes go after a week; keep the 20 newest versions of each image.
LIFECYCLE_POLICY = {
    "rules": [
        {
            "rulePriority": 1,
            "description": "expire untagged images after 7 days",
            "selection": {
                "tagStatus": "untagged",
                "countType": "sinceImagePushed",
                "countUnit": "days",
                "countNumber": 7,
            },
            "action": {"type": "expire"},
        },
        {
            "rulePriority": 2,
            "description": "keep the 20 most recent image versions",
            "selection": {"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": 20},
            "action": {"type": "expire"},
        },
    ]
}


@dataclass(frozen=True)
class LocalImage:
    name: str  # train | serve
    ref: str  # local image reference, e.g. sagemaker-llm-finetune-train:local
    version: str  # content-based tag

    @property
    def repository(self) -> str:
        return f"{IMAGE_PREFIX}-{self.name}"


def docker(*args: str, input_text: str | None = None, capture: bool = True) -> str:
    """Runs the docker CLI; a failure becomes CommandError with docker's own message."""
    try:
        proc = subprocess.run(
            ["docker", *args],
            input=input_text,
            text=True,
            stdout=subprocess.PIPE if capture else sys.stderr,
            stderr=subprocess.PIPE,
        )
    except FileNotFoundError as e:
        raise CommandError("the docker CLI is not installed (needed to push images)") from e
    if proc.returncode != 0:
        raise CommandError(f"docker {args[0]} failed: {proc.stderr.strip() or proc.stdout}")
    return proc.stdout or ""


def local_image(name: str, local_tag: str) -> LocalImage:
    ref = f"{IMAGE_PREFIX}-{name}:{local_tag}"
    try:
        info = json.loads(docker("image", "inspect", ref))[0]
    except CommandError as e:
        raise UsageError(f"no local image {ref}: build it first with scripts/build-images.sh {name}") from e
    labels = info.get("Config", {}).get("Labels") or {}
    # The build script's hash of the build context; an image built another way falls back to its image ID,
    # which is content-addressed too.
    version = labels.get(CONTENT_KEY_LABEL) or info["Id"].split(":", 1)[1][:16]
    return LocalImage(name=name, ref=ref, version=version)


def ensure_repository(ctx: AwsContext, ecr, repository: str) -> None:
    exists = False
    if not ctx.dry_run:
        try:
            ecr.describe_repositories(repositoryNames=[repository])
            exists = True
        except ecr.exceptions.RepositoryNotFoundException:
            exists = False
    if exists:
        log(f"repository {repository} exists")
        ecr.put_image_scanning_configuration(repositoryName=repository, imageScanningConfiguration={"scanOnPush": True})
    else:
        log(f"creating repository {repository}")
        ecr.create_repository(
            repositoryName=repository,
            imageTagMutability="IMMUTABLE",  # a version tag always means the same content
            imageScanningConfiguration={"scanOnPush": True},
            encryptionConfiguration={"encryptionType": "AES256"},
            tags=[{"Key": "project", "Value": IMAGE_PREFIX}],
        )
    ecr.put_lifecycle_policy(repositoryName=repository, lifecyclePolicyText=json.dumps(LIFECYCLE_POLICY))


def version_in_ecr(ctx: AwsContext, ecr, repository: str, version: str) -> bool:
    if ctx.dry_run:
        return False
    try:
        ecr.describe_images(repositoryName=repository, imageIds=[{"imageTag": version}])
        return True
    except ecr.exceptions.ImageNotFoundException:
        return False


def docker_login(ctx: AwsContext, ecr, registry_override: str | None) -> str:
    """Logs Docker in with a 12-hour ECR token; returns the registry host to push to."""
    response = ecr.get_authorization_token()
    if ctx.dry_run:
        registry = registry_override or f"{ctx.account_id()}.dkr.ecr.{ctx.region}.amazonaws.com"
        print(f"[dry-run] docker login --username AWS --password-stdin {registry}")
        return registry
    data = response["authorizationData"][0]
    user, password = base64.b64decode(data["authorizationToken"]).decode().split(":", 1)
    registry = registry_override or data["proxyEndpoint"].removeprefix("https://").removeprefix("http://")
    docker("login", "--username", user, "--password-stdin", registry, input_text=password)
    log(f"docker logged in to {registry}")
    return registry


def push_images(ctx: AwsContext, names: list[str], local_tag: str, registry_override: str | None) -> list[str]:
    images = [local_image(name, local_tag) for name in names]  # fail before touching AWS
    ecr = ctx.client("ecr")
    registry = docker_login(ctx, ecr, registry_override)
    uris = []
    for image in images:
        ensure_repository(ctx, ecr, image.repository)
        uri = f"{registry}/{image.repository}:{image.version}"
        if version_in_ecr(ctx, ecr, image.repository, image.version):
            log(f"{uri} is already in ECR: not pushed again")
        elif ctx.dry_run:
            print(f"[dry-run] docker tag {image.ref} {uri}")
            print(f"[dry-run] docker push {uri}")
        else:
            docker("tag", image.ref, uri)
            log(f"pushing {uri}")
            docker("push", uri, capture=False)  # docker's own layer progress, on the terminal
        uris.append(uri)
    return uris


def add_arguments(parser) -> None:
    parser.add_argument("--images", nargs="+", choices=IMAGES, default=list(IMAGES), help="which images to push")
    parser.add_argument("--local-tag", default="local", help="tag of the locally built images (default: local)")
    parser.add_argument(
        "--registry",
        help="push to this registry host instead of the one ECR names (a pull-through cache or a local test registry)",
    )


def run(ctx: AwsContext, args) -> int:
    for uri in push_images(ctx, args.images, args.local_tag, args.registry):
        print(uri)
    return 0
