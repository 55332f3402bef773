import os

import pytest

# Tests never let Great Expectations (or anything else) reach for the network.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from pipeline.core.config import Params, params_from_dict  # noqa: E402
from pipeline.core.io import Layout  # noqa: E402
from tests.helpers import TINY  # noqa: E402


@pytest.fixture
def layout(tmp_path) -> Layout:
    return Layout(tmp_path)


@pytest.fixture
def tiny_params() -> Params:
    """The suite's tiny synthetic configuration (tests/helpers.py: TINY)."""
    return params_from_dict(TINY)
