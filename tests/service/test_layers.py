"""Properties of the package as a whole: the API never loads torch, and openapi.json is current."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from service.openapi import openapi_text
from tests.service.conftest import ModelSet
from tests.service.harness import REPO

NO_TORCH = """
import sys
from fastapi.testclient import TestClient
import service.server, service.cli
from service.app import create_app
from service.settings import Settings
settings = Settings(data_dir=sys.argv[1], model_roots=[sys.argv[2]])
with TestClient(create_app(settings)) as client:
    response = client.post("/merge", json={"base_model": "small/base", "adapters": ["small/lora"]})
    assert response.status_code == 202, response.text
    bad = client.post("/merge", json={"base_model": "small/base", "adapters": ["other/lora"]})
    assert bad.status_code == 422, bad.text
loaded = sorted(name for name in sys.modules if name == "torch" or name.startswith("torch."))
assert not loaded, loaded
print("no torch")
"""


def test_api_never_imports_torch(models: ModelSet, tmp_path: Path) -> None:
    """The app, a full preflight (plan of a real merge) and a rejected one, all without torch."""
    result = subprocess.run([sys.executable, "-c", NO_TORCH, str(tmp_path), str(models.root)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "no torch" in result.stdout, result.stderr


def test_openapi_json_is_current() -> None:
    committed = (REPO / "openapi.json").read_text()
    assert json.loads(committed) == json.loads(openapi_text()), (
        "openapi.json is stale: run `python -m service.openapi > openapi.json`")
