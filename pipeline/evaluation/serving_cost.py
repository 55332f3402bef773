"""Serving cost of a model: latency for one user, throughput for a batch, size, parameters.

Latency is measured after warm-up, one request at a time, with the torch
thread count fixed and recorded; the median and the 95th percentile are
reported (the machines are shared, so single timings are noise).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from pipeline.models.recommender import Recommender


@dataclass(frozen=True)
class ServingCost:
    threads: int
    device: str
    latency_p50_ms: float  # batch of 1, top-k over the full catalogue
    latency_p95_ms: float
    throughput_users_per_s: float  # batches of `batch_size`
    batch_size: int
    requests: int

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure_serving(
    recommender: Recommender,
    histories: Sequence[Sequence[int]],
    k: int = 10,
    requests: int = 200,
    warmup: int = 20,
    batch_size: int = 256,
    threads: int | None = None,
) -> ServingCost:
    """Batch-1 latency over `requests` histories (cycled) and batch throughput over all of them."""
    if not histories:
        raise ValueError("need at least one history to time")
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        sync = torch.cuda.synchronize if recommender.device.type == "cuda" else (lambda: None)
        for i in range(warmup):
            recommender.recommend([histories[i % len(histories)]], k)
        sync()
        latencies = []
        for i in range(requests):
            started = time.perf_counter()
            recommender.recommend([histories[i % len(histories)]], k)
            sync()
            latencies.append((time.perf_counter() - started) * 1000)
        batches = [histories[i : i + batch_size] for i in range(0, len(histories), batch_size)]
        recommender.recommend(batches[0], k)  # warm the batch path too
        sync()
        started = time.perf_counter()
        for batch in batches:
            recommender.recommend(batch, k)
        sync()
        throughput = len(histories) / (time.perf_counter() - started)
        return ServingCost(
            threads=torch.get_num_threads(),
            device=str(recommender.device),
            latency_p50_ms=statistics.median(latencies),
            latency_p95_ms=percentile(latencies, 0.95),
            throughput_users_per_s=throughput,
            batch_size=batch_size,
            requests=requests,
        )
    finally:
        torch.set_num_threads(previous_threads)
