"""A trained tiny work dir shared by the registry tests (built once per module), and a fresh copy per test."""

from __future__ import annotations

import pytest

from tests.registry_helpers import build_trained, clone_workdir, save_random_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    layout = build_trained(tmp_path_factory.mktemp("trained"))
    save_random_model(layout, "random")
    return layout


@pytest.fixture
def work(trained, tmp_path):
    return clone_workdir(trained, tmp_path / "work")
