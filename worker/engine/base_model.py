"""A base model folder in Hugging Face layout: config.json plus one or several safetensors shards."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter_merge.worker.engine.errors import InputError, InputRef
from adapter_merge.worker.engine.safetensors_format import SafetensorsFile, read_header
from adapter_merge.worker.engine.tensor_info import TensorInfo

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class BaseModel:
    root: Path
    config: dict[str, Any]
    shards: tuple[SafetensorsFile, ...]
    """In shard-name order; the output keeps this layout unless re-sharding is asked for."""
    tensors: dict[str, TensorInfo]

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))


def read_json(path: Path, what: str, input: InputRef) -> dict[str, Any]:
    """Load a JSON object of merge input `input`, with an error that names the file when it is missing or
    malformed."""
    if not path.is_file():
        raise InputError(f"{path}: {what} not found", file=path, input=input)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: {what} is not valid JSON ({error})", file=path, input=input) from error
    if not isinstance(value, dict):
        raise InputError(f"{path}: {what} is not a JSON object", file=path, input=input)
    return value


def load_base_model(root: Path) -> BaseModel:
    if not root.is_dir():
        raise InputError(f"{root}: base model folder not found", file=root, input="base")
    config = read_json(root / "config.json", "base model config.json", "base")
    paths, weight_map = _shard_paths(root)
    shards = tuple(read_header(path, "base") for path in paths)
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for name, info in shard.tensors.items():
            if name in tensors:
                raise InputError(f"{shard.path}: tensor {name!r} is also in {tensors[name].file.name}",
                                 file=shard.path, tensor=name, input="base")
            tensors[name] = info
    if not tensors:
        raise InputError(f"{root}: base model has no tensors", file=root, input="base")
    for name, shard_name in (weight_map or {}).items():
        if name not in tensors or tensors[name].file.name != shard_name:
            raise InputError(f"{root / INDEX_FILE}: tensor {name!r} is not in {shard_name}",
                             file=root / INDEX_FILE, tensor=name, input="base")
    return BaseModel(root=root, config=config, shards=shards, tensors=tensors)


def _shard_paths(root: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The shard files, and the index's weight map to cross-check them against when there is one."""
    index_path = root / INDEX_FILE
    if index_path.is_file():
        index = read_json(index_path, "shard index", "base")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index_path}: no weight_map", file=index_path, input="base")
        names = sorted(set(weight_map.values()))
        for name in names:
            if not isinstance(name, str) or Path(name).name != name or not (root / name).is_file():
                raise InputError(f"{index_path}: shard {name!r} not found in {root}", file=index_path, input="base")
        return [root / name for name in names], weight_map
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE], None
    if any(root.glob("*.bin")) or any(root.glob("*.pt")):
        raise InputError(f"{root}: base model has only pickle weights; convert it to safetensors first",
                         file=root, input="base")
    raise InputError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE} in the base model folder", file=root, input="base")
