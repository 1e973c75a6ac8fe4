"""A load check on a real server over loopback: while hostile requests are being refused (a 100 MB body, a
pattern that backtracks catastrophically, a safetensors header of a million entries), `/healthz` answers
within 100 ms at the 99th percentile. Bounded: a fixed number of probes and attacks, then it stops."""

from __future__ import annotations

import json
import multiprocessing
import statistics
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from tests.service.harness import service_env, start_server

PROBES = 300
P99_LIMIT_SECONDS = 0.1


def write_huge_header_base(folder: Path, entries: int) -> None:
    """A valid safetensors file whose header lists `entries` empty tensors (~60 MB of JSON)."""
    folder.mkdir(parents=True)
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(entries)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))


def write_backtracking_pair(root: Path) -> None:
    """A base whose one module is named by a long run of `a`s, and an adapter for it whose alpha_pattern
    `(a+)+c` makes a backtracking regex engine try every way of splitting that run."""
    module = "model." + "a" * 40
    (root / "base").mkdir()
    save_file({f"{module}.weight": torch.zeros(4, 4)}, str(root / "base" / "model.safetensors"))
    (root / "base" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "backtracking").mkdir()
    save_file({f"base_model.model.{module}.lora_A.weight": torch.zeros(2, 4),
               f"base_model.model.{module}.lora_B.weight": torch.zeros(4, 2)},
              str(root / "backtracking" / "adapter_model.safetensors"))
    (root / "backtracking" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "alpha_pattern": {"(a+)+c": 1}}))


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    write_huge_header_base(root / "huge-header", 1_000_000)
    write_backtracking_pair(root)
    return root


@pytest.fixture(scope="module")
def server(hostile_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("load-data")
    process, api = start_server(service_env(data, hostile_root, MERGE_PREFLIGHT_SECONDS="3",
                                            MERGE_LOG_LEVEL="warning"), data / "server.log")
    yield api.base_url
    api.close()
    process.stop()


ATTACKS = {
    "100 MB body": {"content": b"x" * 100_000_000, "headers": {"content-type": "application/json"}},
    "1 M-entry header": {"json": {"base_model": "huge-header", "adapters": ["backtracking"]}},
    "backtracking pattern": {"json": {"base_model": "base", "adapters": ["backtracking"]}},
}


def _attack(url: str, rounds: int, answers: multiprocessing.Queue) -> None:
    """In a process of its own, so the attack does not compete with the probes for this process's GIL."""
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(rounds):
            for name, request in ATTACKS.items():
                try:
                    answers.put((name, client.post("/merge", **request).status_code))
                except httpx.TransportError:  # refused and closed while the body was still being sent
                    answers.put((name, "closed"))


def test_healthz_stays_fast_under_attack(server: str) -> None:
    answers: multiprocessing.Queue = multiprocessing.Queue()
    attackers = [multiprocessing.get_context("fork").Process(target=_attack, args=(server, 4, answers))
                 for _ in range(2)]
    for attacker in attackers:
        attacker.start()
    latencies = []
    with httpx.Client(base_url=server, timeout=10) as client:
        time.sleep(0.5)  # the attacks are under way
        for _ in range(PROBES):
            started = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
    for attacker in attackers:
        attacker.join(180)
    seen: dict[str, set[object]] = {}
    while not answers.empty():
        name, status = answers.get()
        seen.setdefault(name, set()).add(status)
    p99 = statistics.quantiles(latencies, n=100)[98]
    print(f"/healthz under attack: {PROBES} probes, median {statistics.median(latencies) * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms; attack answers {seen}")
    assert seen["100 MB body"] <= {413, "closed"}
    assert seen["1 M-entry header"] <= {422, 503}
    assert seen["backtracking pattern"] <= {202, 422, 503}  # 202 once patterns cannot backtrack
    assert p99 < P99_LIMIT_SECONDS
