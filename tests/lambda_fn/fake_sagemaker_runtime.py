"""A tiny stand-in for the SageMaker Runtime API, for tests of the Lambda path (not the endpoint emulator).

    python tests/lambda_fn/fake_sagemaker_runtime.py --port 8081 [--endpoint qa-endpoint] [--variant tuned]

POST /endpoints/<name>/invocations with {"inputs": ..., "parameters": ...} answers TGI-style
[{"generated_text": ...}] (with "details" when parameters.details is true) and
x-Amzn-Invoked-Production-Variant. Markers in the question steer it: "[model-error]" -> 424 ModelError,
"[sleep=N]" -> answer after N seconds, "[finish=REASON]" -> an empty answer whose details.finish_reason is
REASON (the model server's "timeout" for a request that expired in its queue), "[sources]" -> the reply
carries "sources" like a model with a retrieval index (none when parameters.retrieval is false). An unknown
endpoint name gets 400 ValidationError, like the real service.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ANSWER = "SageMaker is a fully managed service to build, train and deploy machine learning models."
SOURCES = [
    {"id": 0, "title": "What is Amazon SageMaker?", "source": "faq.csv#1", "score": 1.8},
    {"id": 7, "title": "faq.md: Getting started", "source": "faq.md#p2", "score": 0.9},
]


def make_handler(endpoint: str, variant: str):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def _send(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._send(200, {"status": "ok"})

        def do_POST(self):
            match = re.fullmatch(r"/endpoints/([^/]+)/invocations", self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if not match:
                return self._send(404, {"message": f"no route {self.path}"})
            if match.group(1) != endpoint:
                return self._send(
                    400,
                    {"message": f"Endpoint {match.group(1)} of account 123456789012 not found."},
                    {"x-amzn-ErrorType": "ValidationError"},
                )
            request = json.loads(body)
            question = request["inputs"]
            if "[model-error]" in question:
                return self._send(
                    424,
                    {
                        "Message": 'Received server error (500) from primary with message "boom"',
                        "OriginalStatusCode": 500,
                        "OriginalMessage": "boom",
                    },
                    {"x-amzn-ErrorType": "ModelError"},
                )
            sleep = re.search(r"\[sleep=([0-9.]+)\]", question)
            if sleep:
                time.sleep(float(sleep.group(1)))
            chosen = self.headers.get("X-Amzn-SageMaker-Target-Variant") or variant
            finish = re.search(r"\[finish=([a-z_]+)\]", question)
            item = {"generated_text": "" if finish else ANSWER}
            parameters = request.get("parameters") or {}
            if parameters.get("details"):
                reason = finish.group(1) if finish else "eos_token"
                item["details"] = {"finish_reason": reason, "generated_tokens": 0 if finish else 16}
            if "[sources]" in question and parameters.get("retrieval", True) is not False:
                item["sources"] = SOURCES
            self._send(200, [item], {"x-Amzn-Invoked-Production-Variant": chosen})

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--endpoint", default="qa-endpoint")
    parser.add_argument("--variant", default="AllTraffic")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args.endpoint, args.variant))
    print(f"fake sagemaker-runtime on http://127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
