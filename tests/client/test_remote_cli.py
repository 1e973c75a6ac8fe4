"""`adapter-merge submit / status / jobs / cancel / download` through the installed entry point against real
servers: a merge with --wait (tqdm's bar and ETA on stderr) and --download, --json output that is JSON only,
problems on one line with exit 1, usage errors with exit 2, the token from --token or MERGE_TOKEN."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from adapter_merge.client import Job
from tests.client.conftest import KeyedService

ENTRY_POINT = str(Path(sys.executable).with_name("adapter-merge"))


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if key not in ("MERGE_URL", "MERGE_TOKEN")}
    return subprocess.run([ENTRY_POINT, *args], capture_output=True, text=True, timeout=180, env={**clean, **env})


def test_submit_wait_download(service: str, tmp_path: Path) -> None:
    done = cli("submit", "small/base", "small/lora", "small/dora", "--weights", "1,0.5", "--dtype", "bfloat16",
               "--no-reuse", "--wait", "--download", str(tmp_path / "out"), MERGE_URL=service)
    assert done.returncode == 0, done.stderr
    first_line = done.stdout.splitlines()[0]
    assert " succeeded in " in first_line and done.stdout.splitlines()[1] == f"downloaded to {tmp_path / 'out'}"
    assert "merging: 100%" in done.stderr and "<00:00" in done.stderr  # tqdm's bar, its ETA at the end
    job_id = first_line.split()[1]

    shown = cli("status", job_id, "--json", "--url", service)
    job = json.loads(shown.stdout)
    assert job["id"] == job_id and job["request"]["output_dtype"] == "bfloat16"
    for artifact in job["artifacts"]:
        assert hashlib.sha256((tmp_path / "out" / artifact["path"]).read_bytes()).hexdigest() == artifact["sha256"]

    again = cli("download", job_id, str(tmp_path / "again"), "--url", service)
    assert again.returncode == 0 and again.stdout == f"downloaded {len(job['artifacts'])} files to " \
                                                      f"{tmp_path / 'again'}\n"
    listed = cli("jobs", "--status", "succeeded", "--limit", "500", "--json", "--url", service)
    assert job_id in {item["id"] for item in json.loads(listed.stdout)}
    assert job_id in cli("jobs", "--url", service).stdout


def test_json_output_is_json_only(service: str) -> None:
    submitted = cli("submit", "small/base", "small/lora", "--json", "--wait", MERGE_URL=service)
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert job["status"] == "succeeded" and submitted.stderr == ""


def test_problems_exit_1_with_their_detail_on_one_line(service: str, merged: Job) -> None:
    for args, detail in [
        (("status", "no-such-job"), "job 'no-such-job' does not exist"),
        (("submit", "no/such/model", "small/lora"), "base_model: 'no/such/model'"),
        (("submit", "small/base", "small/lora", "--dtype", "float8"), "output_dtype: "),
        (("cancel", merged.id), "nothing to cancel"),
    ]:
        result = cli(*args, "--url", service)
        assert (result.returncode, result.stdout) == (1, ""), (args, result)
        assert result.stderr.startswith("adapter-merge: ") and detail in result.stderr, (args, result.stderr)
        assert result.stderr.count("\n") == 1
    unreachable = cli("jobs", "--url", "http://127.0.0.1:9")
    assert unreachable.returncode == 1 and "cannot reach http://127.0.0.1:9" in unreachable.stderr


def test_usage_errors_exit_2(service: str) -> None:
    for args in [("submit", "small/base"), ("submit", "small/base", "small/lora", "--weights", "heavy"),
                 ("submit", "small/base", "small/lora", "--weights", "1,2"), ("jobs", "--status", "done")]:
        result = cli(*args, "--url", service)
        assert result.returncode == 2 and result.stdout == "" and "error" in result.stderr, (args, result)


def test_the_token_comes_from_the_flag_or_the_environment(keyed_service: KeyedService) -> None:
    refused = cli("jobs", "--url", keyed_service.url)
    assert refused.returncode == 1 and "Authorization: Bearer" in refused.stderr
    key = next(key for key, (_, role) in keyed_service.keys.items() if role == "read")
    assert cli("jobs", "--json", "--url", keyed_service.url, "--token", key).returncode == 0
    from_env = cli("jobs", "--json", MERGE_URL=keyed_service.url, MERGE_TOKEN=key)
    assert from_env.returncode == 0 and isinstance(json.loads(from_env.stdout), list)
