"""Shared, lazily built inputs for the engine tests: each base, adapter, oracle and merge is made once."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

from adapter_merge.worker.engine import AdapterSpec, MergeOptions, merge
from tests.builders import CASES, AdapterRecipe, BaseSpec, Case, build_adapter, build_base
from tests.oracle import load_dir_tensors, oracle_state_dict

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


class Workspace:
    """Builds inputs on first use under one session folder and memoises them (and the merges) by key."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._oracles: dict[str, dict[str, torch.Tensor]] = {}
        self._merged: dict[tuple, Path] = {}

    def base(self, spec: BaseSpec) -> Path:
        path = self.root / "bases" / spec.key
        if not path.exists():
            build_base(spec, path)
        return path

    def adapter(self, spec: BaseSpec, recipe: AdapterRecipe, *, safe: bool = True) -> Path:
        path = self.root / "adapters" / f"{spec.key}-{recipe.name}{'' if safe else '-bin'}"
        if not path.exists():
            build_adapter(self.base(spec), recipe, path, safe=safe)
        return path

    def inputs(self, case: Case) -> tuple[Path, list[tuple[Path, float]]]:
        """The base folder and (adapter folder, weight) pairs of a case."""
        adapters = [(self.adapter(case.base, r), w)
                    for r, w in zip(case.adapters, case.adapter_weights, strict=True)]
        return self.base(case.base), adapters

    def oracle(self, case: Case) -> dict[str, torch.Tensor]:
        if case.name not in self._oracles:
            base_dir, adapters = self.inputs(case)
            self._oracles[case.name] = oracle_state_dict(
                base_dir, adapters, untie=case.untie, vocab_size=case.resized_vocab)
        return self._oracles[case.name]

    def base_tensors(self, case: Case) -> dict[str, torch.Tensor]:
        return load_dir_tensors(self.base(case.base))

    def merged(self, case: Case, dtype: str = "auto", max_shard_size: int | None = None) -> Path:
        """Run the engine once per (case, dtype, shard size) and return the output folder."""
        key = (case.name, dtype, max_shard_size)
        if key not in self._merged:
            out = self.root / "merged" / "-".join(str(k) for k in key)
            base_dir, adapters = self.inputs(case)
            run_merge(base_dir, adapters, out, dtype=dtype, max_shard_size=max_shard_size)
            self._merged[key] = out
        return self._merged[key]


def run_merge(base_dir: Path, adapters: list[tuple[Path, float]], out: Path, *, dtype: str = "auto",
              max_shard_size: int | None = None) -> None:
    """Merge through the engine's public API, as a caller of the library would."""
    merge(base_dir, [AdapterSpec(path, weight) for path, weight in adapters], out,
          MergeOptions(dtype=dtype, max_shard_size=max_shard_size))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    yield Workspace(tmp_path_factory.mktemp("engine"))


@dataclass
class Inputs:
    """Private copies of a good base and two good adapters (LoRA, DoRA) over it, plus an output path."""

    base: Path
    lora: Path
    dora: Path
    out: Path

    @property
    def out_parent(self) -> Path:
        return self.out.parent


@pytest.fixture
def inputs(workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Inputs:
    case = CASES["llama_stacked"]  # a bf16 Llama with a LoRA and a DoRA adapter
    base_dir, ((lora, _), (dora, _)) = workspace.inputs(case)
    copies = [shutil.copytree(src, tmp_path / "in" / name) for src, name in
              [(base_dir, "base"), (lora, "lora"), (dora, "dora")]]
    (tmp_path / "outs").mkdir()
    monkeypatch.setenv("ADAPTER_MERGE_CACHE", str(tmp_path / "checksum-cache"))
    return Inputs(*copies, out=tmp_path / "outs" / "merged")


def pytest_configure(config: pytest.Config) -> None:
    # Known, harmless warnings from building tiny models with PEFT; keep the summary for real ones.
    for line in ("ignore::FutureWarning:transformers", "ignore:Setting `save_embedding_layers`:UserWarning",
                 "ignore:Model has `tie_word_embeddings=True`:UserWarning",
                 "ignore:fan_in_fan_out is set to:UserWarning"):
        config.addinivalue_line("filterwarnings", line)
