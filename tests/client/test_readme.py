"""The README's "client in five lines of Python", exactly as written there, against a real server whose first
model root holds the models it names (links to the small model set, in a second root); only the URL is this
server's."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

from tests.client.conftest import serving
from tests.service.conftest import ModelSet
from tests.service.harness import REPO

README_URL = "http://127.0.0.1:8000"
NAMES = {"llama-3-8b": "base", "my-lora": "lora", "other-lora": "dora"}


def five_lines() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### The client in five lines of Python"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert snippet is not None
    code = snippet.group(1)
    assert len([line for line in code.splitlines() if line.strip()]) == 5, code
    return code


def test_the_readme_snippet_merges(models: ModelSet, tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    for name, folder in NAMES.items():
        (root / name).symlink_to(models.root / "small" / folder, target_is_directory=True)
    code = five_lines()
    assert README_URL in code
    with serving(tmp_path, root, MERGE_MODEL_ROOTS=f"{root}:{models.root}") as url:  # links into a root
        result = subprocess.run([sys.executable, "-c", code.replace(README_URL, url)], cwd=tmp_path,
                                capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "succeeded 100%", result.stdout
    merged = tmp_path / "merged"
    outputs = json.loads((merged / "merge_manifest.json").read_text())["outputs"]
    assert outputs and (merged / "config.json").is_file() and not list(merged.rglob("*.partial"))
    for entry in outputs:
        assert hashlib.sha256((merged / entry["path"]).read_bytes()).hexdigest() == entry["sha256"], entry["path"]
