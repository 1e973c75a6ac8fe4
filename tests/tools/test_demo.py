"""The README's first quick-start command, `make demo`, runs end to end: a server in embedded mode, a merge
over HTTP, every artifact verified against its sha256."""

from __future__ import annotations

import subprocess
import sys

from tests.service.harness import REPO


def test_demo_merges_over_http_and_verifies_everything() -> None:
    result = subprocess.run([sys.executable, "-m", "tools.demo"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all checks passed" in result.stdout
    assert "timings (s):" in result.stdout and "server stopped (exit 0)" in result.stdout
