"""Fixtures of the browser tests: models to merge, and Debian's Chromium driven by Playwright.

Playwright cannot download its own browser here (no network), so it drives the system's Chromium
(`apt-get install chromium`; `.ci/run` installs it) with the flags that keep Chromium off the network it would
otherwise call at start (updates, sync, safe browsing): every request a test page makes goes to the server.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.service.conftest import BIG_SHAPE, SMALL_REQUEST, long_request, write_small

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SLOW_SHAPE = {**BIG_SHAPE, "hidden": 2048, "intermediate": 5632}
"""The service tests' big model twice as wide: ~1.2 GB of bf16, merged into 2.4 GB of float32, a few seconds, long
enough to watch the bar move."""


@dataclass(frozen=True)
class WebModels:
    root: Path
    small: dict
    """A merge of the demo-sized model (~7 MB): about a second."""
    slow: dict
    """A merge of a few seconds (SLOW_SHAPE)."""


@pytest.fixture(scope="session")
def web_models(tmp_path_factory: pytest.TempPathFactory) -> WebModels:
    root = tmp_path_factory.mktemp("web-models")
    write_small(root)
    return WebModels(root, small=SMALL_REQUEST, slow=long_request(root, "slow", SLOW_SHAPE))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.fail(f"the browser tests need Debian's Chromium at {CHROMIUM}: apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield browser
        browser.close()
