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

from tools.synthetic import DEMO, write_llama_base, write_lora_adapter

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SLOW_SHAPE = {"hidden": 2048, "intermediate": 5632, "layers": 12, "heads": 8, "kv_heads": 2, "vocab": 8000,
              "max_shard_bytes": 150_000_000}
"""~1.2 GB of bf16, merged into 2.4 GB of float32: a few seconds, long enough to watch the bar move."""


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
    small = write_llama_base(root / "small/base", **DEMO)
    write_lora_adapter(small, root / "small/lora", r=8)
    write_lora_adapter(small, root / "small/dora", r=8, dora=True, seed=2)
    slow = write_llama_base(root / "slow/base", **SLOW_SHAPE)
    write_lora_adapter(slow, root / "slow/dora", r=16, dora=True, seed=3)
    write_lora_adapter(slow, root / "slow/lora", r=16, seed=4)
    return WebModels(
        root,
        small={"base_model": "small/base", "adapters": ["small/lora", {"ref": "small/dora", "weight": 0.5}]},
        slow={"base_model": "slow/base", "adapters": ["slow/dora", "slow/lora"], "output_dtype": "float32"},
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.fail(f"the browser tests need Debian's Chromium at {CHROMIUM}: apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield browser
        browser.close()
