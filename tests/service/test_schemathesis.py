"""schemathesis against a live server's own `/openapi.json`: every check, a fixed seed, authenticated, a
bounded number of examples. The models the schema's example request names exist, so generated merges run
and the job, artifact and archive operations are reached too. Zero server errors, zero schema violations."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

from tests.service.conftest import ModelSet
from tests.service.harness import REPO, service_env, start_server

KEY = "schemathesis-admin-key"
EXAMPLES_PER_OPERATION = 50
SEED = 42


def test_schemathesis_finds_nothing(models: ModelSet, tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    for name, source in (("llama-3-8b", "base"), ("my-lora", "lora"), ("other-lora", "dora")):
        (root / name).symlink_to(models.root / "small" / source, target_is_directory=True)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"sha256": hashlib.sha256(KEY.encode()).hexdigest(), "tenant": "fuzz",
                                          "role": "admin"}]}))
    env = service_env(tmp_path / "data", root, MERGE_AUTH="required", MERGE_API_KEYS_FILE=str(keys),
                      MERGE_LOG_LEVEL="warning")
    server, api = start_server(env, tmp_path / "server.log")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(REPO / "tests/service/schemathesis.toml"),
             "run", f"{api.base_url}/openapi.json", "--checks", "all", "--seed", str(SEED),
             "--max-examples", str(EXAMPLES_PER_OPERATION), "--header", f"Authorization: Bearer {KEY}",
             "--no-color", "--workers", "1"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )
    finally:
        api.close()
        server.stop()
    summary = re.search(r"(\d+) generated, (.*)", result.stdout)
    print(f"schemathesis: {summary.group(0) if summary else 'no summary'}")
    assert result.returncode == 0, result.stdout[-6000:]
    assert summary and int(summary.group(1)) > 0 and "fail" not in summary.group(2)
