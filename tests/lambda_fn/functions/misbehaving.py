"""A Lambda function that misbehaves on request, to test the runtime emulator's error paths."""

import json
import os
import time


def handler(event, context):
    if "requestContext" in event:  # through API Gateway: the instructions are in the request body
        event = json.loads(event.get("body") or "{}")
    action = event.get("action", "echo")
    if action == "raise":
        raise ValueError("asked to fail")
    if action == "sleep":
        time.sleep(float(event["seconds"]))
        return {"slept": event["seconds"]}
    if action == "exit":
        os._exit(3)
    if action == "context":
        return {
            "remaining_ms": context.get_remaining_time_in_millis(),
            "function_name": context.function_name,
            "request_id": context.aws_request_id,
            "arn": context.invoked_function_arn,
            "pid": os.getpid(),
        }
    if action == "proxy":
        return event["result"]
    return event
