"""`adapter-merge submit / status / jobs / cancel / download` through the installed entry point against real
servers: a merge with --wait (tqdm's bar and ETA on stderr) and --download, --json output that is JSON only,
problems on one line with exit 1, usage errors with exit 2, the token from --token or MERGE_TOKEN."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from adapter_merge.cli.remote import ProgressBar
from adapter_merge.client import Job, Progress
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
    assert "merging: 100%|" in done.stderr  # tqdm's bar (a merge this small is often done at the first poll)
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
        (("submit", "small/base", "small/lora", "--weights", "1e30", "--dtype", "float16", "--no-reuse", "--wait"),
         " failed: "),
    ]:
        result = cli(*args, "--url", service)
        assert (result.returncode, result.stdout) == (1, ""), (args, result)
        error = result.stderr.splitlines()[-1]  # after --wait's progress bar, if any
        assert error.startswith("adapter-merge: ") and detail in error, (args, result.stderr)
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


def test_the_progress_bar_has_one_bar_per_phase_with_an_eta(capsys: pytest.CaptureFixture[str]) -> None:
    """The bar as --wait drives it, from the jobs its polls return: a bar per phase, starting where the job was
    first seen (no made-up rate), and tqdm's ETA ([elapsed<remaining]) once bytes move."""
    bar = ProgressBar()
    for phase, done, total in [("queued", 0, 0), ("downloading", 0, 4096), ("downloading", 4096, 4096),
                               ("merging", 1024, 8192), ("merging", 4096, 8192), ("merging", 8192, 8192)]:
        bar(Job(id="j", status="running", progress=Progress(phase, 0, 0, done, total), artifacts=(), error=None,
                data={}))
    bar.close()
    lines = [line.strip() for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[0].startswith("downloading:   0%") and lines[-1].startswith("merging: 100%|")
    assert "1.00k/8.00k" in next(line for line in lines if line.startswith("merging"))  # begins where first seen
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, ", lines[-1]), lines[-1]  # an ETA, not "?"
