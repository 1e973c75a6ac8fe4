"""Inputs for the service tests, built once per session with tools.synthetic, and the Redis namespace.

Two model sets live under one model root: a small demo-sized model (fast end-to-end checks) and a big one
(~0.3 GB, merged into 0.6 GB of float32: 2-3 s, long enough to cancel or kill a merge mid-way, short enough
to run one to the end several times). Each merge the service runs is compared with the engine CLI's output
for the same inputs, computed here once.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapter_merge.cli.main import main as cli_main
from adapter_merge.core.store import JobStore
from adapter_merge.core.store.local import SQLiteJobStore
from adapter_merge.core.store.redis import RedisJobStore
from tests.redis_server import RedisServer
from tools.synthetic import DEMO, write_llama_base, write_lora_adapter

BIG_SHAPE = {"hidden": 1024, "intermediate": 2816, "layers": 12, "heads": 8, "kv_heads": 2, "vocab": 8000,
             "max_shard_bytes": 150_000_000}
SMALL_REQUEST = {"base_model": "small/base", "adapters": ["small/lora", {"ref": "small/dora", "weight": 0.5}]}
"""Both adapter spellings (bare ref and {ref, weight}), two adapters, one weighted: the models of `write_small`."""


@dataclass(frozen=True)
class ModelSet:
    root: Path
    outside: Path
    """A folder outside the root, holding a perfectly good model (for the escape tests)."""


def cli_merge(base: Path, adapters: list[tuple[Path, float]], out: Path, dtype: str = "auto") -> Path:
    """The engine's own CLI on the same inputs: the reference every service result must equal (run in this
    process, where torch is loaded already)."""
    arguments = ["merge", str(base), *(str(path) for path, _ in adapters), "--out", str(out), "--dtype", dtype,
                 "--quiet", "--weights", ",".join(str(weight) for _, weight in adapters)]
    assert cli_main(arguments) == 0, f"engine CLI failed: adapter-merge {' '.join(arguments)}"
    return out


def write_small(root: Path) -> None:
    """SMALL_REQUEST's models under `root/small`: the demo-sized base (~7 MB, a merge of about a second) with a LoRA
    and a DoRA adapter. The browser tests write the same into their own model root."""
    base = write_llama_base(root / "small/base", **DEMO)
    write_lora_adapter(base, root / "small/lora", r=8)
    write_lora_adapter(base, root / "small/dora", r=8, dora=True, seed=2)


def long_request(root: Path, name: str, shape: dict[str, int]) -> dict:
    """A merge of a few seconds under `root/name` (written the first time): a base of `shape`, a DoRA and a LoRA
    adapter, float32 output. The service tests use BIG_SHAPE, the browser tests a larger one."""
    folder = root / name
    if not folder.exists():
        base = write_llama_base(folder / "base", **shape)
        write_lora_adapter(base, folder / "dora", r=16, dora=True, seed=3)
        write_lora_adapter(base, folder / "lora", r=16, seed=4)
    return {"base_model": f"{name}/base", "adapters": [f"{name}/dora", f"{name}/lora"], "output_dtype": "float32"}


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> ModelSet:
    root = tmp_path_factory.mktemp("models")
    write_small(root)
    # An adapter trained for a differently shaped model: valid on its own, but it does not fit small/base.
    other = write_llama_base(root / "other/base", hidden=128, intermediate=344, layers=2, heads=4, kv_heads=2,
                             vocab=512)
    write_lora_adapter(other, root / "other/lora", r=4)
    outside = tmp_path_factory.mktemp("outside")
    write_llama_base(outside / "base", hidden=64, intermediate=172, layers=1, heads=2, kv_heads=1, vocab=128)
    (root / "escape").symlink_to(outside / "base", target_is_directory=True)
    return ModelSet(root, outside)


@pytest.fixture(scope="session")
def small_request() -> dict:
    return SMALL_REQUEST


@pytest.fixture(scope="session")
def small_reference(models: ModelSet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = models.root / "small"
    return cli_merge(root / "base", [(root / "lora", 1.0), (root / "dora", 0.5)],
                     tmp_path_factory.mktemp("reference") / "small")


@pytest.fixture(scope="session")
def big_request(models: ModelSet) -> dict:
    """A merge of a few seconds: ~0.3 GB base, a DoRA and a LoRA adapter, 0.6 GB of float32 output."""
    return long_request(models.root, "big", BIG_SHAPE)


@pytest.fixture(scope="session")
def big_reference(models: ModelSet, big_request: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = models.root / "big"
    return cli_merge(root / "base", [(root / "dora", 1.0), (root / "lora", 1.0)],
                     tmp_path_factory.mktemp("reference") / "big", dtype="float32")


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer) -> Iterator[JobStore]:
    """Each job store backend in turn: a SQLite file, and real Redis under a private key prefix."""
    if request.param == "sqlite":
        yield SQLiteJobStore(tmp_path / "jobs.sqlite3")
        return
    prefix = f"amtest-store-{uuid.uuid4().hex[:8]}"
    backend = RedisJobStore(redis_server.url(), prefix)
    yield backend
    keys = list(backend.redis.scan_iter(match=f"{prefix}:*"))
    if keys:
        backend.redis.delete(*keys)
    backend.close()
