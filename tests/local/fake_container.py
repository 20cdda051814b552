"""A stand-in serving container for the endpoint emulator's tests: /ping and /invocations on loopback.

It speaks the same contract as containers/serve (TGI-style request `{"inputs": ..., "stream": true}`
answered as `text/event-stream`), and the request body steers misbehaviour the emulator must map:

    {"inputs": "hi"}                            200 JSON echo of the input and of the headers it received
    {"inputs": "hi", "stream": true}            SSE token frames, each written in two pieces with a pause
                                                in between, so frames straddle chunk boundaries
    {"status": 400, "message": "bad"}           that status with {"error": "bad"}
    {"sleep": 3}                                answer only after 3 s
    {"stream": true, "stall_after": 2}          two frames, then silence
    {"stream": true, "break_after": 2}          two frames, then the connection drops mid-chunk
    {"stream": true, "tokens": 50}              how many tokens to stream (default 5)
    {"stream": true, "token_delay": 0.1}        seconds of "generation" before each token

Run: python tests/local/fake_container.py --port 18080 --name tuned [--not-ready]
"""

from __future__ import annotations

import argparse
import json
import time

from flask import Flask, Response, request

ECHOED_HEADERS = (
    "Content-Type",
    "Accept",
    "X-Amzn-SageMaker-Custom-Attributes",
    "X-Amzn-SageMaker-Inference-Id",
    "X-Amzn-SageMaker-Target-Variant",
    "X-Amzn-SageMaker-Accept",
    "Authorization",
)


def create_app(name: str = "fake", ready: bool = True) -> Flask:
    app = Flask(__name__)

    @app.get("/ping")
    def ping():
        return ("", 200) if ready else ("loading", 503)

    @app.post("/invocations")
    def invocations():
        if not ready:
            return Response(json.dumps({"error": "model not loaded"}), 503, mimetype="application/json")
        raw = request.get_data()
        try:
            payload = json.loads(raw or b"{}")
        except ValueError:
            payload = {"inputs": raw.decode("latin-1")}
        if not isinstance(payload, dict):
            payload = {"inputs": payload}
        time.sleep(float(payload.get("sleep", 0)))
        headers = {}
        if "X-Amzn-SageMaker-Custom-Attributes" in request.headers:
            headers["X-Amzn-SageMaker-Custom-Attributes"] = (
                "echo=" + request.headers["X-Amzn-SageMaker-Custom-Attributes"]
            )
        if "status" in payload:
            body = json.dumps({"error": payload.get("message", "failed")})
            return Response(body, int(payload["status"]), mimetype="application/json", headers=headers)
        if payload.get("stream"):
            return Response(_sse(payload), mimetype="text/event-stream", headers=headers)
        body = {
            "generated_text": f"echo: {str(payload.get('inputs', ''))[:100]}",
            "container": name,
            "headers": {h: request.headers[h] for h in ECHOED_HEADERS if h in request.headers},
            "bytes_received": len(raw),
        }
        if "pad" in payload:
            body["pad"] = "x" * int(payload["pad"])
        return Response(json.dumps(body), 200, mimetype="application/json", headers=headers)

    def _sse(payload):
        count = int(payload.get("tokens", 5))
        stall_after = payload.get("stall_after")
        break_after = payload.get("break_after")
        token_delay = float(payload.get("token_delay", 0))
        text = ""
        for i in range(count):
            if stall_after is not None and i == int(stall_after):
                time.sleep(3600)
            time.sleep(token_delay)
            token = f"{name}-t{i} "
            text += token
            last = i == count - 1
            frame = json.dumps(
                {
                    "token": {"id": i, "text": token, "logprob": 0.0, "special": False},
                    "generated_text": text if last else None,
                    "details": None,
                }
            )
            data = f"data:{frame}\n\n".encode()
            if break_after is not None and i == int(break_after):
                yield data[:7]
                raise ConnectionAbortedError("fake container drops the connection mid-stream")
            # Two writes per frame, apart in time: the emulator must pass each piece on as it comes.
            half = len(data) // 2
            yield data[:half]
            time.sleep(0.005)
            yield data[half:]

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="fake")
    parser.add_argument("--not-ready", action="store_true", help="/ping answers 503 forever")
    args = parser.parse_args()
    app = create_app(args.name, ready=not args.not_ready)
    app.run(host="127.0.0.1", port=args.port, threaded=True)


if __name__ == "__main__":
    main()
