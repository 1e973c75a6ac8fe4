"""The README's first quick-start command, `make demo`, runs end to end: a server in embedded mode, a merge
over HTTP, every artifact verified against its sha256; and again, in the same checkout, a second time."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.service.harness import REPO


def test_demo_merges_over_http_and_verifies_everything() -> None:
    for _ in range(2):  # a second run used to find the first one's job and merge nothing
        result = subprocess.run([sys.executable, "-m", "tools.demo"], cwd=REPO, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "all checks passed" in result.stdout
        assert "server stopped (exit 0)" in result.stdout
        assert re.search(r"timings \(s\): queued [\d.]+  resolve [\d.]+  merge [\d.]+", result.stdout), result.stdout
