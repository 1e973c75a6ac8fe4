"""Properties of the package as a whole: the API never loads torch, and openapi.json is current."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from adapter_merge.core.settings import Settings
from adapter_merge.service.openapi import openapi_text
from tests.service.conftest import ModelSet
from tests.service.harness import REPO, service_env

NO_TORCH = """
import sys
from fastapi.testclient import TestClient
import adapter_merge.cli.serve, adapter_merge.cli.main
from adapter_merge.core.settings import Settings
from adapter_merge.service.app import create_app
settings = Settings(data_dir=sys.argv[1], model_roots=[sys.argv[2]], auth="none")
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


API_IMPORTS = """
import json, sys
from importlib.metadata import packages_distributions
from pathlib import Path
import adapter_merge.cli.serve
from adapter_merge.core.preflight import preflight
from adapter_merge.core.request import MergeRequest
from adapter_merge.core.settings import Settings
from adapter_merge.service.deps import Services
settings = Settings()
services = Services.open(settings)
request = MergeRequest(base_model="small/base", adapters=["small/lora"])
preflight(request, services.context.sources, Path(sys.argv[1]))
services.preflight.check(request, "default")  # the same in the API's preflight process
services.dispatcher.ping()
services.close()
owners = packages_distributions()
tops = {name.split(".")[0] for name in sys.modules} - set(sys.stdlib_module_names)
print(json.dumps(sorted({dist for top in tops for dist in owners.get(top, [])})))
"""


# Imported when present, never needed: uvicorn and kombu try PyYAML; setuptools' .pth hook in any venv; httpx
# loads its command line (click, rich, pygments) when those are installed; FastAPI's OpenTelemetry API loads the
# SDK (and the SDK psutil) when the test venv has them, which mlflow-skinny brings; Celery takes its thread ids
# from greenlet when it is installed (playwright, for tests/web, brings it).
OPTIONAL = {"pyyaml", "setuptools", "click", "rich", "pygments", "opentelemetry-sdk", "opentelemetry-proto",
            "opentelemetry-semantic-conventions", "psutil", "greenlet"}


def requirement_closure(lines: list[str]) -> set[str]:
    """Every distribution installing `lines` brings in, from the installed metadata."""
    seen: set[str] = set()
    stack = [Requirement(line) for line in lines]
    while stack:
        requirement = stack.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = distribution(requirement.name).requires or []
        except PackageNotFoundError:
            continue
        for text in requires:
            child = Requirement(text)
            extras = ["", *sorted(requirement.extras)]
            if child.marker is None or any(child.marker.evaluate({"extra": extra}) for extra in extras):
                stack.append(child)
    return seen


def test_api_image_requirements_cover_what_the_api_imports(models: ModelSet, tmp_path: Path,
                                                           redis_namespace: dict[str, str]) -> None:
    """docker/Dockerfile.api installs only docker/api-requirements.txt: the distributed API (store, broker,
    preflight, server) must import nothing else, and never torch."""
    env = service_env(tmp_path, models.root, **redis_namespace)
    result = subprocess.run([sys.executable, "-c", API_IMPORTS, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    imported = {canonicalize_name(name) for name in json.loads(result.stdout.splitlines()[-1])}
    lines = [line.split("#")[0].strip() for line in (REPO / "docker/api-requirements.txt").read_text().splitlines()]
    allowed = requirement_closure([line for line in lines if line]) | {"adapter-merge"} | OPTIONAL
    assert "torch" not in imported
    assert imported <= allowed, f"the API image lacks {sorted(imported - allowed)}"


def test_openapi_json_is_current() -> None:
    committed = (REPO / "openapi.json").read_text()
    assert json.loads(committed) == json.loads(openapi_text()), (
        "openapi.json is stale: run `python -m adapter_merge.service.openapi > openapi.json`")


def test_every_setting_is_documented() -> None:
    docs = (REPO / "README.md").read_text()
    missing = [f"MERGE_{name.upper()}" for name in Settings.model_fields if f"`MERGE_{name.upper()}`" not in docs]
    assert not missing, f"README.md does not document {missing}"
