"""A base model folder in Hugging Face layout: config.json plus one or several safetensors shards."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter_merge.worker.engine.errors import InputError, brief
from adapter_merge.worker.engine.folder_kind import BASE_MARKER, require_model_folder
from adapter_merge.worker.engine.folder_survey import FolderSurvey, survey_folder
from adapter_merge.worker.engine.input_files import InputFiles
from adapter_merge.worker.engine.safetensors_format import SafetensorsFile, read_header
from adapter_merge.worker.engine.tensor_info import TensorInfo

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_INDEX_BYTES = 32 * 2**20
"""The index names every tensor of the model (about 100 bytes each): the largest public ones (MoE models with
fp8 scales, ~180,000 tensors) are under 20 MB."""


@dataclass(frozen=True)
class BaseModel:
    root: Path
    config: dict[str, Any]
    shards: tuple[SafetensorsFile, ...]
    """In shard-name order; the output keeps this layout unless re-sharding is asked for."""
    tensors: dict[str, TensorInfo]
    survey: FolderSurvey
    """What else the folder holds: the files copied into the output, and what is skipped and why."""
    files: tuple[Path, ...]
    """Every file the merge reads (config.json, the index, the shards, the files it copies), in path order:
    each has been checked to be a regular file inside the allowed roots, and each is hashed for the manifest."""

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))


def load_base_model(root: Path, files: InputFiles) -> BaseModel:
    require_model_folder(root, "base")
    config = files.read_json(root / BASE_MARKER, "base model config.json", "base")
    paths, weight_map = _shard_paths(root, files)
    shards = tuple(read_header(path, "base", files) for path in paths)
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
            raise InputError(f"{root / INDEX_FILE}: tensor {brief(name)} is not in {shard_name}",
                             file=root / INDEX_FILE, tensor=name, input="base")
    read = [root / BASE_MARKER, *(shard.path for shard in shards)] + ([root / INDEX_FILE] if weight_map else [])
    survey = survey_folder(root, frozenset(path.name for path in read), files)
    return BaseModel(root=root, config=config, shards=shards, tensors=tensors, survey=survey,
                     files=tuple(sorted([*read, *survey.copies])))


def _shard_paths(root: Path, files: InputFiles) -> tuple[list[Path], dict[str, str] | None]:
    """The shard files, and the index's weight map to cross-check them against when there is one."""
    index_path = root / INDEX_FILE
    if index_path.is_file():
        index = files.read_json(index_path, "shard index", "base", MAX_INDEX_BYTES)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index_path}: no weight_map", file=index_path, input="base")
        for name, shard_name in weight_map.items():
            if not isinstance(shard_name, str):
                raise InputError(f"{index_path}: weight_map gives {brief(shard_name)} as the file of {brief(name)}",
                                 file=index_path, tensor=name, input="base")
        names = sorted(set(weight_map.values()))
        for name in names:
            if Path(name).name != name or not (root / name).is_file():
                raise InputError(f"{index_path}: shard {brief(name)} not found in {root}", file=index_path,
                                 input="base")
        return [root / name for name in names], weight_map
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE], None
    if any(root.glob("*.bin")) or any(root.glob("*.pt")):
        raise InputError(f"{root}: base model has only pickle weights; convert it to safetensors first",
                         file=root, input="base")
    raise InputError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE} in the base model folder", file=root, input="base")
