"""The MLflow UI's page of a registered version shows the description pipeline/registry/describe.py wrote:
opened in headless Chromium, checked in the page's text, and screenshotted (a CI test artifact)."""

from __future__ import annotations

import json
import re
import time

import pytest

from mlflow import MlflowClient
from pipeline.registry.promote import promote
from pipeline.registry.register import register
from tests.browser import Browser, find_chromium, keep_as_test_artifact
from tests.mlflow_server import plain_server
from tests.registry_helpers import NO_BUDGET, compress, sqlite_tracking


def _first_words(markdown: str, count: int = 8) -> str:
    """The description's first words as the page shows them (markdown emphasis and code marks rendered away)."""
    return " ".join(re.sub(r"[*`]", "", markdown.split("\n", 1)[0]).split()[:count])


@pytest.mark.slow
def test_the_version_page_shows_the_description_and_is_screenshotted(work, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; .ci/run installs it)")
    compress(work, ("int8_table",))
    tracking = sqlite_tracking(tmp_path)
    registered = register(NO_BUDGET, tracking, work)
    promote(NO_BUDGET, tracking, work)  # the gate's decision joins the description
    version = MlflowClient(tracking.tracking_uri, tracking.tracking_uri).get_model_version("leanrec", registered["version"])
    opening, gate = _first_words(version.description), "Promoted"
    assert "Gate (" in version.description and f"**{gate}**" in version.description

    with plain_server(tracking.tracking_uri, tmp_path) as uri, Browser(chromium, width=1400, height=1400) as browser:
        browser.navigate(f"{uri}/#/models/leanrec/versions/{registered['version']}")
        # A React app: the description arrives after the page has loaded.
        shown = f"document.body && document.body.innerText.includes({json.dumps(opening)})"
        browser.wait_for(shown, timeout=90, what=f"the description's first words {opening!r}")
        assert browser.evaluate(f"document.body.innerText.includes({json.dumps(gate)})")
        time.sleep(1)  # let the remaining panels settle before the picture
        shot = browser.screenshot(tmp_path / f"mlflow_model_version_leanrec_{registered['version']}.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    print("version page screenshot: " + ", ".join(str(p) for p in filter(None, (shot, keep_as_test_artifact(shot)))))
