"""register checks its inputs before it touches the registry: the compression report it picks from."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline.core.config import RegistryConfig, TrackingConfig
from pipeline.core.errors import RegistryError
from pipeline.registry.register import read_compression, register


def test_register_without_the_evaluation_report_names_the_stages_to_run(layout):
    # tracking points nowhere reachable: the check must come before any registry call
    tracking = TrackingConfig(tracking_uri="http://127.0.0.1:9/")
    with pytest.raises(RegistryError, match=r"compression\.json not found: run the compress and evaluate stages first"):
        register(RegistryConfig(), tracking, layout)


def test_a_report_written_without_some_variants_says_so(layout, caplog):
    layout.reports_dir.mkdir(parents=True)
    report = {"models": {"teacher": {"path": "models/main"}}, "missing_variants": ["int8"]}
    (layout.reports_dir / "compression.json").write_text(json.dumps(report))

    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert read_compression(layout) == report

    assert "without compress.variants ['int8']" in caplog.text and "python -m pipeline compress" in caplog.text
