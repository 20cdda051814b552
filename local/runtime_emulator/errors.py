"""The errors the SageMaker Runtime API returns, in the one wire shape botocore's rest-json parser reads.

botocore takes the error code from the `x-amzn-ErrorType` header (text after ':' dropped), the message
from the body's `message`/`Message`, and fills modeled members (ModelError's OriginalStatusCode,
OriginalMessage, LogStreamArn) from the body, so `ClientError.response["Error"]["Code"]` and
`client.exceptions.ModelError` behave as against AWS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RuntimeApiError(Exception):
    code: str
    status: int
    message: str
    fields: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code} ({self.status}): {self.message}"

    def body(self) -> dict[str, Any]:
        return {"Message": self.message, **self.fields}


def validation_error(message: str) -> RuntimeApiError:
    return RuntimeApiError("ValidationError", 400, message)


def model_not_ready(message: str) -> RuntimeApiError:
    return RuntimeApiError("ModelNotReadyException", 429, message)


def internal_failure(message: str) -> RuntimeApiError:
    return RuntimeApiError("InternalFailure", 500, message)


def log_stream_arn(region: str, account_id: str, endpoint: str, variant: str) -> str:
    # Shaped like the real log stream ARN; locally the "log stream" is the container's own stdout.
    return (
        f"arn:aws:logs:{region}:{account_id}:log-group:/aws/sagemaker/Endpoints/{endpoint}:log-stream:{variant}/local"
    )


def model_error(
    *,
    original_status: int | None,
    original_message: str,
    container: str,
    endpoint: str,
    region: str,
    account_id: str,
    variant: str,
) -> RuntimeApiError:
    """ModelError (424) worded like AWS: 'Received client error (400) from primary with message "..."'."""
    status_for_text = original_status if original_status is not None else 0
    kind = "client" if 400 <= status_for_text < 500 else "server"
    message = (
        f'Received {kind} error ({status_for_text}) from {container} with message "{original_message}". '
        f"See the emulator's and the container's logs for endpoint {endpoint} (variant {variant})."
    )
    fields: dict[str, Any] = {
        "OriginalMessage": original_message,
        "LogStreamArn": log_stream_arn(region, account_id, endpoint, variant),
    }
    if original_status is not None:
        fields["OriginalStatusCode"] = original_status
    return RuntimeApiError("ModelError", 424, message, fields)
