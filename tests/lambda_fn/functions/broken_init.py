"""A Lambda function whose module fails at import: the runtime reports an init error."""

raise RuntimeError("broken at import")


def handler(event, context):  # pragma: no cover - never reached
    return event
