"""A bounded load test of the served model over loopback: requests/s, p50/p99, 5xx count, server RSS.

Starts the model server (`python -m pipeline.serving.server`, or `mlflow models serve` with
--server mlflow) for a model URI, or for a tiny model trained and logged here when none is given
(the same tiny SASRec as the serving tests: a few hundred users and items, d_model 16, max_len 20).
Then, for each client count, threads with one keep-alive connection each send a fixed mix of
requests (a known user, or a history of 5-50 raw item IDs, one row each, k = 10) until either
--requests requests are done or --seconds have passed, whichever comes first. Stdlib only.

Reported per client count: requests done, requests/s, p50 and p99 latency (ms), 4xx and 5xx
counts (5xx must be 0), and the server's RSS (every process of its group: the launcher and the
uvicorn workers) before the first run and after each.

    python benchmarks/serving_load.py                                  # tiny model, 1 worker, 1 and 8 clients
    python benchmarks/serving_load.py --workers 2 --clients 8
    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python benchmarks/serving_load.py --model-uri models:/leanrec@champion

Writes benchmarks/results/serving-load.json (gitignored) and logs the table.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("serving_load")
RESULTS = ROOT / "benchmarks" / "results"


def tiny_model(root: Path) -> tuple[str, list[int], list[int]]:
    """Train and log the serving tests' tiny model to a SQLite store under root; its URI, user IDs and item IDs."""
    import pyarrow.parquet as pq

    import mlflow
    from pipeline.serving.pyfunc import log_servable
    from tests.registry_helpers import build_trained

    layout = build_trained(root)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    experiment = mlflow.create_experiment("load", artifact_location=(root / "mlartifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = log_servable(layout.model_dir("main"), layout.features_dir)
    users = pq.read_table(layout.features_dir / "user_vocab.parquet").column("id").to_pylist()
    items = pq.read_table(layout.features_dir / "item_vocab.parquet").column("id").to_pylist()
    return info.model_uri, users, items


def ids_of(model_uri: str) -> tuple[list, list]:
    """The known users' and the items' raw IDs, from the serving data the model was logged with."""
    import mlflow.artifacts
    import pyarrow.parquet as pq

    from pipeline.serving.pyfunc import DATA_ARTIFACT, ITEMS_FILE, USERS_FILE

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    data = next(local.rglob(DATA_ARTIFACT))
    return pq.read_table(data / USERS_FILE).column("id").to_pylist(), pq.read_table(data / ITEMS_FILE).column("id").to_pylist()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(kind: str, model_uri: str, port: int, workers: int, log: Path) -> subprocess.Popen:
    python_bin = Path(sys.executable).parent
    if kind == "mlflow":
        cmd = [str(python_bin / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    else:
        cmd = [sys.executable, "-m", "pipeline.serving.server", "-m", model_uri]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PATH": f"{python_bin}{os.pathsep}{os.environ['PATH']}"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise TimeoutError(f"the server did not answer /ping within 300 s: {log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def group_rss_mib(pgid: int) -> float:
    """Resident memory of every process in the server's process group (launcher + workers), MiB."""
    total_kib = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:  # field 5 of /proc/<pid>/stat: the process group
                continue
            status = (entry / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue
        total_kib += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total_kib / 1024


def request_bodies(users: list, items: list, n: int, seed: int) -> list[bytes]:
    """A fixed mix: half known users, half histories of 5-50 items (one in ten not in the catalogue)."""
    rng = random.Random(seed)
    bodies = []
    for i in range(n):
        if i % 2 == 0:
            row = {"user_id": rng.choice(users), "k": 10}
        else:
            history = [rng.choice(items) if rng.random() > 0.1 else 10**12 + i for _ in range(rng.randint(5, 50))]
            row = {"history": history, "k": 10}
        bodies.append(json.dumps({"dataframe_records": [row]}).encode())
    return bodies


def run_clients(port: int, bodies: list[bytes], clients: int, max_requests: int, max_seconds: float) -> dict:
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []
    counter = iter(range(max_requests))
    started = time.perf_counter()
    deadline = started + max_seconds

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.perf_counter() < deadline:
            with lock:
                index = next(counter, None)
            if index is None:
                break
            sent = time.perf_counter()
            try:
                connection.request("POST", "/invocations", body=bodies[index % len(bodies)],
                                   headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException) as err:
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                with lock:
                    errors.append(type(err).__name__)
                continue
            elapsed = time.perf_counter() - sent
            with lock:
                latencies.append(elapsed)
                statuses[status] = statuses.get(status, 0) + 1
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {
        "clients": clients, "requests": len(latencies), "seconds": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
        "status_4xx": sum(n for s, n in statuses.items() if 400 <= s < 500),
        "status_5xx": sum(n for s, n in statuses.items() if s >= 500),
        "connection_errors": len(errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", help="a model to serve (default: train and log a tiny one)")
    parser.add_argument("--server", choices=["leanrec", "mlflow"], default="leanrec")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=1000, help="at most this many requests per client count")
    parser.add_argument("--seconds", type=float, default=20.0, help="at most this long per client count")
    parser.add_argument("--warmup", type=int, default=300, help="requests sent first, not measured (JIT, caches)")
    parser.add_argument("--out", type=Path, default=RESULTS / "serving-load.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    with tempfile.TemporaryDirectory(prefix="leanrec-load-") as scratch:
        root = Path(scratch)
        if args.model_uri:
            model_uri = args.model_uri
            users, items = ids_of(model_uri)
        else:
            logger.info("training and logging the tiny model")
            model_uri, users, items = tiny_model(root)
        port = _free_port()
        proc = start_server(args.server, model_uri, port, args.workers, root / "server.log")
        try:
            bodies = request_bodies(users, items, 500, seed=0)
            rss_before = group_rss_mib(proc.pid)
            run_clients(port, bodies, 1, args.warmup, 60)
            runs = []
            for clients in args.clients:
                result = run_clients(port, bodies, clients, args.requests, args.seconds)
                result["rss_mib_after"] = round(group_rss_mib(proc.pid), 1)
                runs.append(result)
                logger.info("%s", result)
        finally:
            stop(proc)
    report = {
        "server": args.server, "workers": args.workers, "model_uri": args.model_uri or "tiny (tests/registry_helpers)",
        "rss_mib_before": round(rss_before, 1), "runs": runs, "machine": {
            "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "limits": {"requests": args.requests, "seconds": args.seconds, "warmup": args.warmup},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    lines = [f"server {args.server}, {args.workers} worker(s), RSS before {report['rss_mib_before']} MiB",
             "| clients | requests | req/s | p50 ms | p99 ms | 4xx | 5xx | RSS after MiB |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['clients']} | {r['requests']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['status_4xx']} | {r['status_5xx']} | {r['rss_mib_after']} |" for r in runs]
    logger.info("\n%s\nwritten to %s", "\n".join(lines), args.out)
    if any(r["status_5xx"] or r["connection_errors"] for r in runs):
        raise SystemExit("5xx answers or connection errors: see the table")


if __name__ == "__main__":
    main()
