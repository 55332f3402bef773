"""The HTTP model server: MLflow's scoring app for a registered model, behind a guard on the request body.

`mlflow models serve` hands the request body straight to `json.loads`. A JSON nested deeper than
Python's recursion limit (about 1000 levels) raises RecursionError there, which MLflow does not
catch: HTTP 500. `RequestGuard` reads the body first and answers

* 413 for a body over MAX_BODY_BYTES (checked on Content-Length and while reading), and
* 400 for a JSON body nested deeper than MAX_JSON_DEPTH (a valid request nests 4 levels),

in MLflow's error format (`{"error_code": "BAD_REQUEST", "message": ...}`); every other request
reaches MLflow's app unchanged (same routes, same request and response JSON, same pyfunc, whose
`parse_request` answers 400 for a malformed table), except that an error response over
MAX_ERROR_BYTES keeps only a cut version of its message (MLflow prefixes a predict error's message
with the whole request table as pandas prints it, long column names included).

    python -m pipeline.serving.server -m models:/leanrec@champion --host 127.0.0.1 --port 5001 --workers 2

`--workers` (default: `MLFLOW_MODELS_WORKERS`, else 1, as `mlflow models serve`) is the number of
uvicorn worker processes; each loads the model. One worker scores one request at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 2**20  # a request of MAX_ROWS rows with long histories fits well below this
MAX_JSON_DEPTH = 32  # nesting levels of the request JSON ({"dataframe_records": [{"history": [...]}]} is 4)
MAX_ERROR_BYTES = 4096  # an error response longer than this keeps a cut version of its message
MODEL_PATH_ENV = "LEANREC_SERVED_MODEL_PATH"  # the downloaded model directory, for the workers
WORKERS_ENV = "MLFLOW_MODELS_WORKERS"  # the same variable `mlflow models serve --workers` reads
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"  # read by MLflow's app: seconds per request

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# A JSON string literal (escapes included): brackets inside one do not nest.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def json_depth(body: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (0 for a scalar); never parses it recursively."""
    if body.count(b"[") + body.count(b"{") == 0:
        return 0
    steps = _OPEN[np.frombuffer(_JSON_STRING.sub(b'""', body), dtype=np.uint8)]
    steps = steps[np.flatnonzero(steps)]  # the brackets only: a far shorter running sum
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def _error_body(message: str) -> bytes:
    return json.dumps({"error_code": "BAD_REQUEST", "message": message}).encode()


class RequestGuard:
    """ASGI middleware: a POST body is read whole, refused when too large or too deeply nested, else passed on."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int = MAX_BODY_BYTES, max_depth: int = MAX_JSON_DEPTH,
                 max_error_bytes: int = MAX_ERROR_BYTES):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_depth = max_depth
        self.max_error_bytes = max_error_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        too_large = f"the request body is over {self.max_body_bytes} bytes; split it into smaller requests"
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").strip()
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await _reply(send, 413, too_large)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                await _reply(send, 413, too_large)
                return
        is_json = b"json" in headers.get(b"content-type", b"").lower()
        if is_json and (depth := json_depth(bytes(body))) > self.max_depth:
            await _reply(send, 400, f"the request JSON nests {depth} levels deep; at most {self.max_depth} are accepted")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, _ShortErrors(send, self.max_error_bytes))


class _ShortErrors:
    """The `send` of an error response: a JSON body over max_bytes keeps only a cut version of its message.

    MLflow prefixes the message of a predict error with the request table as pandas prints it
    ("Failed to predict data '<table>'. \nError: <message>"); pandas cuts long cells but not column
    names, so a 20 MB column name came back twice. The part after "Error: " is LeanRec's own message.
    """

    def __init__(self, send: Send, max_bytes: int):
        self.send = send
        self.max_bytes = max_bytes
        self.start: Message | None = None
        self.body = bytearray()

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            self.start = message  # held back until the body is complete
            return
        if self.start is None or message["type"] != "http.response.body":
            await self.send(message)
            return
        self.body += message.get("body", b"")
        if message.get("more_body", False):
            return
        body = bytes(self.body)
        if len(body) > self.max_bytes:
            body = _cut_error(body, self.max_bytes)
        headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
        await self.send({**self.start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await self.send({"type": "http.response.body", "body": body})


def _cut_error(body: bytes, max_bytes: int) -> bytes:
    try:
        error = json.loads(body)
        message = str(error["message"])
    except (ValueError, KeyError, TypeError, RecursionError):
        error, message = {"error_code": "BAD_REQUEST"}, body.decode("utf-8", errors="replace")
    message = message.rsplit("\nError: ", 1)[-1]
    keep = max_bytes // 2
    if len(message) > keep:
        message = message[: keep // 2] + " ... " + message[-keep // 2 :]
    slim = {key: value for key, value in error.items() if key in ("error_code", "sqlstate", "error_class")}
    return json.dumps({**slim, "message": message}).encode()


async def _reply(send: Send, status: int, message: str) -> None:
    content = _error_body(message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]})
    await send({"type": "http.response.body", "body": content})


def guarded_app(model: Any) -> RequestGuard:
    """MLflow's scoring app (FastAPI: /invocations, /ping, /health, /version) for a loaded pyfunc, guarded."""
    from mlflow.pyfunc import scoring_server

    return RequestGuard(scoring_server.init(model))


def create_app() -> RequestGuard:
    """The app of one uvicorn worker: the model at MODEL_PATH_ENV (set by `main`), loaded as MLflow serves it."""
    from mlflow.pyfunc import scoring_server

    return guarded_app(scoring_server.load_model_with_mlflow_config(os.environ[MODEL_PATH_ENV]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.serving.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model-uri", required=True, help="e.g. models:/leanrec@champion, runs:/<id>/model or a path")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("-w", "--workers", type=int, default=int(os.environ.get(WORKERS_ENV) or 1),
                        help=f"uvicorn worker processes, each with its own copy of the model (default: ${WORKERS_ENV} or 1)")
    parser.add_argument("-t", "--timeout", type=int, default=int(os.environ.get(TIMEOUT_ENV) or 60),
                        help="seconds per request before a 504 (default: 60)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    import mlflow.artifacts
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    local_path = mlflow.artifacts.download_artifacts(artifact_uri=args.model_uri)
    os.environ[MODEL_PATH_ENV] = local_path
    os.environ[TIMEOUT_ENV] = str(args.timeout)
    logger.info("serving %s (%s) on %s:%d with %d worker(s)", args.model_uri, local_path, args.host, args.port, args.workers)
    uvicorn.run("pipeline.serving.server:create_app", factory=True, host=args.host, port=args.port, workers=args.workers)


if __name__ == "__main__":
    main()
