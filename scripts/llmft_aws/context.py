"""Credentials, region, role and dry-run: the one module that knows how an AWS session is found.

Every command resolves an `AwsContext` before its first API call, so a missing credential, region or role is
a usage error (exit 2) with the fix in the message, never a stack trace from deep inside botocore.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

EXIT_USAGE = 2
EXIT_FAILED = 1

ROLE_ARN_RE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
DRY_RUN_ACCOUNT = "123456789012"


class UsageError(Exception):
    """Bad arguments or missing setup (credentials, region, role): exit 2, nothing was changed."""


class CommandError(Exception):
    """The command ran and something in AWS (or Docker) failed: exit 1, the message says what and where."""


def log(message: str) -> None:
    """Progress goes to stderr so stdout carries only the results (URIs, names) that scripts can capture."""
    print(f"[llmft-aws] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class AwsContext:
    region: str
    dry_run: bool = False
    profile: str | None = None
    _session: Any = field(default=None, repr=False, compare=False)

    def client(self, service: str, **kwargs):
        if self.dry_run:
            return DryRunClient(service, self.region)
        return self._session.client(service, region_name=self.region, **kwargs)

    @property
    def session(self):
        return self._session

    def account_id(self) -> str:
        if self.dry_run:
            return DRY_RUN_ACCOUNT
        return self.client("sts").get_caller_identity()["Account"]


def resolve(region: str | None = None, profile: str | None = None, dry_run: bool = False) -> AwsContext:
    """An AwsContext, or UsageError saying exactly what is missing. Makes no network call.

    A dry run needs no credentials (nothing is sent), but still a region: the printed calls and ARNs name it.
    """
    import botocore.exceptions
    import botocore.session

    try:
        core = botocore.session.Session(profile=profile)
        # botocore reads AWS_DEFAULT_REGION and the profile; AWS_REGION is what the other SDKs and Lambda set.
        region = region or os.environ.get("AWS_REGION") or core.get_config_variable("region")
    except botocore.exceptions.ProfileNotFound as e:
        raise UsageError(f"AWS profile {profile!r} not found in your AWS config ({e})") from e
    if not region:
        raise UsageError(
            "no AWS region: pass --region, or set AWS_REGION (or AWS_DEFAULT_REGION), or `region` in your AWS profile"
        )
    if not dry_run:
        try:
            credentials = core.get_credentials()
        except botocore.exceptions.BotoCoreError as e:
            raise UsageError(f"AWS credentials could not be loaded: {e}") from e
        if credentials is None:
            raise UsageError(
                "no AWS credentials found: run `aws configure` or `aws sso login`, or set AWS_PROFILE, or "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (nothing was sent to AWS)"
            )
    import boto3

    session = boto3.Session(botocore_session=core, region_name=region)
    return AwsContext(region=region, dry_run=dry_run, profile=profile, _session=session)


# Training jobs and endpoints assume different roles (infra/template.yaml: training writes its output, hosting
# only reads model archives). SAGEMAKER_ROLE_ARN is still read for a one-role set-up made before the split.
ROLE_ENV = {"training": "SAGEMAKER_TRAINING_ROLE_ARN", "hosting": "SAGEMAKER_HOSTING_ROLE_ARN"}
TEMPLATE_OUTPUT = {"training": "SageMakerTrainingRoleArn", "hosting": "SageMakerHostingRoleArn"}


def require_role(role: str | None, kind: str) -> str:
    """The SageMaker execution role ARN for `kind` ("training" or "hosting") from --role, its own environment
    variable or SAGEMAKER_ROLE_ARN, checked for shape."""
    role = role or os.environ.get(ROLE_ENV[kind]) or os.environ.get("SAGEMAKER_ROLE_ARN", "")
    if not role:
        raise UsageError(
            f"no SageMaker {kind} role: pass --role arn:aws:iam::ACCOUNT:role/NAME or set {ROLE_ENV[kind]} "
            f"(the stack's {TEMPLATE_OUTPUT[kind]} output; docs/aws.md)"
        )
    if not ROLE_ARN_RE.match(role):
        raise UsageError(f"--role {role!r} is not an IAM role ARN (arn:aws:iam::123456789012:role/NAME)")
    return role


class DryRunClient:
    """Stands in for a boto3 client under --dry-run: prints each call it would make, sends nothing.

    It answers every call with an empty response; the commands ask `ctx.dry_run` where the answer matters
    (e.g. "does the repository exist?") and assume a fresh account, so the plan shows every step.
    """

    def __init__(self, service: str, region: str):
        self._service = service
        self._region = region

    def __getattr__(self, operation: str):
        if operation.startswith("_"):
            raise AttributeError(operation)

        def call(**params):
            print(f"[dry-run] {self._service}.{operation} {json.dumps(params, sort_keys=True, default=str)}")
            return {}

        return call

    def get_waiter(self, name: str):
        service = self._service

        class _Waiter:
            def wait(self, **params):
                print(f"[dry-run] {service} waiter {name} {json.dumps(params, sort_keys=True, default=str)}")

        return _Waiter()
