import pytest
import torch

from pipeline.evaluation.serving_cost import measure_serving, percentile
from pipeline.models.recommender import Recommender
from pipeline.models.sasrec import SASRec, SASRecConfig


def test_measure_serving_reports_and_restores_threads():
    rec = Recommender(SASRec(SASRecConfig(n_items=40, d_model=16, n_layers=1, n_heads=2, max_len=8)))
    before = torch.get_num_threads()
    cost = measure_serving(rec, [[1, 2, 3], [4, 5]] * 10, requests=10, warmup=2, batch_size=8, threads=1)
    assert torch.get_num_threads() == before
    assert cost.threads == 1 and cost.device == "cpu" and cost.requests == 10
    assert 0 < cost.latency_p50_ms <= cost.latency_p95_ms
    assert cost.throughput_users_per_s > 0
    with pytest.raises(ValueError, match="at least one history"):
        measure_serving(rec, [])


def test_percentile():
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0
    assert percentile(list(map(float, range(101))), 0.95) == 95.0
