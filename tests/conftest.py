import os

import pytest

# Tests never let Great Expectations (or anything else) reach for the network.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from pipeline.core.config import Params, params_from_dict  # noqa: E402
from pipeline.core.io import Layout  # noqa: E402
from tests.helpers import TINY  # noqa: E402

MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def _restore_mlflow_uris(saved: dict[str, str | None]) -> None:
    import sys

    if "mlflow" in sys.modules:  # the module-level URIs too, for the tests that run in this process
        import mlflow

        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def _mlflow_uris_do_not_leak():
    """mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI in os.environ (so subprocesses inherit it):
    without this, one test's temporary registry became the store of every later test's subprocesses
    (a `dvc repro` then gated against another test's champion)."""
    saved = {name: os.environ.get(name) for name in MLFLOW_URI_VARIABLES}
    yield
    _restore_mlflow_uris(saved)


@pytest.fixture(autouse=True, scope="module")
def _mlflow_uris_do_not_leak_from_module_fixtures():
    """The same for module-scoped fixtures (they set up before any test's own guard saves): a module's
    registry otherwise stayed MLFLOW_REGISTRY_URI for the rest of the session, and a later test's
    `models:/leanrec@champion` download came from that registry instead of the test's own server."""
    saved = {name: os.environ.get(name) for name in MLFLOW_URI_VARIABLES}
    yield
    _restore_mlflow_uris(saved)


@pytest.fixture
def layout(tmp_path) -> Layout:
    return Layout(tmp_path)


@pytest.fixture
def tiny_params() -> Params:
    """The suite's tiny synthetic configuration (tests/helpers.py: TINY)."""
    return params_from_dict(TINY)
