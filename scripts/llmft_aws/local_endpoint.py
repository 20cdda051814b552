"""`deploy --local`: the serving image behind sagemaker-core's local mode (LocalSession), on this machine.

The local SageMaker client takes the CreateModel request `deploy` sends (endpoint.model_request) and the
CreateEndpointConfig / CreateEndpoint calls, runs the image with `serve` through docker compose with the
model.tar.gz unpacked at /opt/ml/model, and waits for /ping; its runtime client then invokes /invocations.
Local mode serves a single variant (the first), on one loopback port. See llmft_aws.sagemaker_local for why
this is sagemaker-core's local mode.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

from llmft_aws.context import CommandError, UsageError, log
from llmft_aws.endpoint import DeploySpec, model_request

DEFAULT_QUESTION = "What is Amazon SageMaker?"


class LocalEndpoint:
    def __init__(self, spec: DeploySpec, port: int, container_root: Path, health_check_timeout_s: int = 600):
        if len(spec.variants) > 1:
            log(f"local mode serves one variant: {spec.variants[0].name} (others are ignored)")
        self.spec = spec
        self.variant = spec.variants[0]
        if not self.variant.model_data.startswith("file://"):
            raise UsageError("deploy --local takes a file:// model.tar.gz (e.g. the one `train --local` printed)")
        self.port = port
        self.container_root = container_root
        self.health_check_timeout_s = health_check_timeout_s
        self.session = None

    def start(self) -> None:
        from llmft_aws.sagemaker_local import local_session

        self.session = local_session(self.container_root, self.port, self.health_check_timeout_s)
        sm = self.session.sagemaker_client
        model_name = self.spec.model_name(self.variant)
        sm.create_model(**model_request(self.spec, self.variant))
        sm.create_endpoint_config(
            EndpointConfigName=self.spec.config_name,
            ProductionVariants=[
                {
                    "VariantName": self.variant.name,
                    "ModelName": model_name,
                    "InitialInstanceCount": 1,
                    "InstanceType": "local",
                    "InitialVariantWeight": 1,
                }
            ],
        )
        log(f"starting local endpoint {self.spec.endpoint} ({self.spec.image}) on 127.0.0.1:{self.port}")
        try:
            sm.create_endpoint(EndpointName=self.spec.endpoint, EndpointConfigName=self.spec.config_name)
        except Exception as e:
            self.stop()
            raise CommandError(f"local endpoint did not become healthy: {e}") from e
        log(f"local endpoint {self.spec.endpoint} is InService")

    def ask(self, question: str, max_new_tokens: int = 32) -> str:
        response = self.session.sagemaker_runtime_client.invoke_endpoint(
            EndpointName=self.spec.endpoint,
            ContentType="application/json",
            Accept="application/json",
            Body=json.dumps({"inputs": question, "parameters": {"max_new_tokens": max_new_tokens}}),
        )
        body = response["Body"].read()
        status = response["ResponseMetadata"]["HTTPStatusCode"]
        if status != 200:
            raise CommandError(f"the local endpoint answered {status}: {body[:300]!r}")
        payload = json.loads(body)
        payload = payload[0] if isinstance(payload, list) else payload
        return payload["generated_text"]

    def stop(self) -> None:
        if self.session is not None:
            sm = self.session.sagemaker_client
            project = self._compose_project()
            sm.delete_endpoint(EndpointName=self.spec.endpoint)
            if project:
                _remove_compose_project(project)
            sm.delete_endpoint_config(EndpointConfigName=self.spec.config_name)
            sm.delete_model(ModelName=self.spec.model_name(self.variant))
            log(f"local endpoint {self.spec.endpoint} stopped")

    def _compose_project(self) -> str | None:
        """The compose project the SDK started the container in (its temporary folder's name)."""
        local = self.session.sagemaker_client._endpoints.get(self.spec.endpoint)  # the SDK keeps no public handle
        container = getattr(local, "container", None)
        root = getattr(container, "container_root", None)
        return Path(root).name.lower() if root else None


def _remove_compose_project(project: str) -> None:
    """The SDK stops the compose process but leaves the exited container behind; remove it."""
    ids = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, timeout=120)


def serve_until_interrupted(endpoint: LocalEndpoint, question: str | None, smoke_test: bool) -> int:
    results = sys.stdout
    # The SDK prints the container's log to stdout; send it to stderr, so stdout carries only the answer.
    with contextlib.redirect_stdout(sys.stderr):
        return _serve(endpoint, question, smoke_test, results)


def _serve(endpoint: LocalEndpoint, question: str | None, smoke_test: bool, results) -> int:
    endpoint.start()
    try:
        if question or smoke_test:
            print(endpoint.ask(question or DEFAULT_QUESTION), file=results, flush=True)
        if smoke_test:
            return 0
        log(f"serving on http://127.0.0.1:{endpoint.port}/invocations; Ctrl-C stops it")
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
        return 0
    finally:
        endpoint.stop()
