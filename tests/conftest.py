import os

import pytest

# Tests never let Great Expectations (or anything else) reach for the network.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from pipeline.core.config import Params, params_from_dict  # noqa: E402
from pipeline.core.io import Layout  # noqa: E402


@pytest.fixture
def layout(tmp_path) -> Layout:
    return Layout(tmp_path)


@pytest.fixture
def tiny_params() -> Params:
    """Small, fast synthetic config (a few thousand interactions)."""
    return params_from_dict(
        {
            "ingest": {"synthetic": {"n_interactions": 5000, "n_items": 200, "mean_sequence_length": 25.0, "n_topics": 5}},
            "validate": {"min_rows": 100},
            "features": {"min_user_interactions": 3, "min_item_interactions": 3},
        }
    )
