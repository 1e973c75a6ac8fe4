"""A PEFT LoRA adapter folder: its config (checked for options we refuse), scaling rules and tensor keys."""

from __future__ import annotations

import collections
import io
import math
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from adapter_merge.worker.engine.base_model import read_json
from adapter_merge.worker.engine.errors import InputError, UnsupportedOptionError
from adapter_merge.worker.engine.safetensors_format import read_header
from adapter_merge.worker.engine.tensor_info import PickledTensor, TensorInfo

T = TypeVar("T")

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
LEGACY_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

# `init_lora_weights` values that rewrite the base weights when the adapter is loaded.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Options whose presence (truthy value) changes what merging means; refused until implemented and tested.
_REFUSED_OPTIONS = (
    "kasa_config",
    "alora_invocation_tokens",
    "arrow_config",
    "layer_replication",
    "target_parameters",
    "use_qalora",
    "use_bdlora",
    "velora_config",
    "monteclora_config",
    "megatron_config",
)

# Suffix of an adapter key -> the role of that tensor in the merge.
LORA_SUFFIXES: dict[str, str] = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_B.bias": "lora_bias",
    ".lora_magnitude_vector": "magnitude",
    ".lora_embedding_A": "embedding_A",
    ".lora_embedding_B": "embedding_B",
    ".token_adapter.trainable_tokens_delta": "token_rows",
}


@dataclass(frozen=True)
class AdapterConfig:
    path: Path
    index: int
    """Position of its adapter in the requested order, for errors."""
    raw: dict[str, Any]
    r: int
    alpha: float
    use_rslora: bool
    use_dora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    trainable_token_indices: list[int] | dict[str, list[int]] | None

    def scaling(self, module_path: str) -> float:
        """PEFT's scale for one module: rank and alpha looked up separately in their patterns."""
        rank = self.r
        alpha = self.alpha
        if (key := _pattern_key(self.rank_pattern, module_path)) is not None:
            rank = self.rank_pattern[key]
        if (key := _pattern_key(self.alpha_pattern, module_path)) is not None:
            alpha = self.alpha_pattern[key]
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def rank(self, module_path: str) -> int:
        key = _pattern_key(self.rank_pattern, module_path)
        return self.r if key is None else self.rank_pattern[key]

    def token_indices(self, module_path: str) -> list[int]:
        indices = self.trainable_token_indices
        if isinstance(indices, dict):
            key = _pattern_key(dict.fromkeys(indices), module_path)
            if key is None:
                raise self._token_indices_error(f"trainable_token_indices names no entry for {module_path!r}")
            indices = indices[key]
        if not indices:
            raise self._token_indices_error(
                f"{module_path!r} has trainable tokens but trainable_token_indices is empty")
        return list(indices)

    def _token_indices_error(self, detail: str) -> InputError:
        return InputError(f"{self.path}: {detail}", file=self.path, option="trainable_token_indices", input=self.index)


def _pattern_key(patterns: dict[str, Any], module_path: str) -> str | None:
    """The first key, in JSON order, that matches the end of the module path (as PEFT matches them)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None


@dataclass(frozen=True)
class Adapter:
    root: Path
    index: int
    """Position in the requested order; names the adapter in messages as well as the path."""
    weight: float
    config: AdapterConfig
    weights_file: Path
    tensors: dict[str, TensorInfo] = field(repr=False)

    @property
    def label(self) -> str:
        return f"adapter {self.index + 1} ({self.root})"


def load_adapter(root: Path, index: int, weight: float) -> Adapter:
    """Adapter `index` of the requested order: its config and its tensors' headers (no tensor data)."""
    if not root.is_dir():
        raise InputError(f"{root}: adapter folder not found", file=root, input=index)
    if not math.isfinite(weight):
        raise InputError(f"{root}: adapter weight {weight} is not a finite number", option="weights", input=index)
    config = parse_config(root / CONFIG_FILE, index)
    if (root / SAFETENSORS_FILE).is_file():
        weights_file = root / SAFETENSORS_FILE
        tensors = read_header(weights_file, index).tensors
    elif (root / LEGACY_FILE).is_file():
        weights_file = root / LEGACY_FILE
        tensors = _legacy_tensor_infos(weights_file, index)
    else:
        raise InputError(f"{root}: no {SAFETENSORS_FILE} (or legacy {LEGACY_FILE}) in the adapter folder",
                         file=root, input=index)
    if not tensors:
        raise InputError(f"{weights_file}: adapter has no tensors", file=weights_file, input=index)
    for name in tensors:
        if not name.startswith(KEY_PREFIX):
            raise InputError(f"{weights_file}: tensor {name!r} does not start with {KEY_PREFIX!r}",
                             file=weights_file, tensor=name, input=index)
    return Adapter(root=root, index=index, weight=weight, config=config, weights_file=weights_file, tensors=tensors)


def parse_config(path: Path, index: int) -> AdapterConfig:
    """Adapter `index`'s adapter_config.json, refusing the options whose merge would be wrong."""
    raw = read_json(path, "adapter config", index)

    def refuse(option: str, detail: str) -> UnsupportedOptionError:
        return UnsupportedOptionError(f"{path}: {detail}", file=path, option=option, input=index)

    if raw.get("peft_type") != "LORA":
        raise refuse("peft_type", f"peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise refuse("init_lora_weights",
                     f"init_lora_weights={init!r} rewrites the base model at load time and is not supported")
    for option in _REFUSED_OPTIONS:
        if raw.get(option):
            raise refuse(option, f"option {option}={raw[option]!r} is not supported")
    if raw.get("use_dora") and raw.get("lora_bias"):
        raise refuse("use_dora", "use_dora together with lora_bias is not supported")

    def value(option: str, convert: Callable[[], T]) -> T:
        """One option's value; a value of the wrong type or range is an error naming the option."""
        try:
            return convert()
        except (TypeError, ValueError) as error:
            raise InputError(f"{path}: {error}", file=path, option=option, input=index) from error

    return AdapterConfig(
        path=path,
        index=index,
        raw=raw,
        r=value("r", lambda: _positive_int(raw.get("r"), "r")),
        alpha=value("lora_alpha", lambda: float(raw.get("lora_alpha", 8))),
        use_rslora=bool(raw.get("use_rslora", False)),
        use_dora=bool(raw.get("use_dora", False)),
        rank_pattern=value("rank_pattern", lambda: {
            key: _positive_int(rank, f"rank_pattern[{key!r}]")
            for key, rank in (raw.get("rank_pattern") or {}).items()
        }),
        alpha_pattern=value("alpha_pattern", lambda: {
            key: float(alpha) for key, alpha in (raw.get("alpha_pattern") or {}).items()
        }),
        trainable_token_indices=raw.get("trainable_token_indices"),
    )


def _positive_int(value: Any, option: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"option {option} must be a positive integer, got {value!r}")
    return value


def split_key(adapter: Adapter, key: str) -> tuple[str, str]:
    """`base_model.model.<module>.<suffix>` -> (module path, role); a non-LoRA key is a replacement tensor.

    With `bias="all"`, PEFT also saves the insides of a modules_to_save wrapper: `<m>.original_module.*`
    (the untouched base: role "base_copy") and `<m>.modules_to_save.*` (the trained copy, also saved as
    plain `<m>.*`: role "wrapped_copy").
    """
    body = key[len(KEY_PREFIX):]
    if ".original_module." in body:
        return body.replace(".original_module.", "."), "base_copy"
    if ".modules_to_save." in body:
        return body.replace(".modules_to_save.", "."), "wrapped_copy"
    for suffix, role in LORA_SUFFIXES.items():
        if body.endswith(suffix):
            return body[: -len(suffix)], role
    if ".lora_" in body or ".token_adapter." in body:
        raise InputError(f"{adapter.weights_file}: tensor {key!r} is of a kind this engine does not know",
                         file=adapter.weights_file, tensor=key, input=adapter.index)
    return body.replace(".base_layer.", "."), "replacement"


_STORAGE_DTYPES = {
    "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16", "DoubleStorage": "F64",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}


def _tensor_header(dtype: str, _offset: int, size: tuple[int, ...], *_rest: object) -> tuple[str, tuple[int, ...]]:
    return dtype, tuple(size)


def _parameter(data: object, *_rest: object) -> object:
    return data


class _HeaderUnpickler(pickle.Unpickler):
    """Reads names, dtypes and shapes from torch's zip-pickle format without torch and without running
    anything: only the few globals a saved state dict uses are allowed, and storages are never loaded."""

    _ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("torch._utils", "_rebuild_tensor_v2"): _tensor_header,
        ("torch._utils", "_rebuild_parameter"): _parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in adapter weights")

    def persistent_load(self, pid: Any) -> str:
        return str(pid[1])  # ('storage', <dtype code from find_class>, key, location, numel)


def _legacy_tensor_infos(path: Path, index: int) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of adapter `index`'s legacy `adapter_model.bin`, read torch-free so planning
    stays torch-free.

    The values themselves are loaded later by the merge with `torch.load(weights_only=True)`.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            pickled = next(name for name in archive.namelist() if name.endswith("/data.pkl"))
            state = _HeaderUnpickler(io.BytesIO(archive.read(pickled))).load()
    except (OSError, zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, ValueError, TypeError,
            IndexError, EOFError) as error:
        raise InputError(f"{path}: not a readable PyTorch state dict ({error or type(error).__name__})",
                         file=path, input=index) from error
    if not isinstance(state, dict) or not all(isinstance(v, tuple) for v in state.values()):
        raise InputError(f"{path}: legacy adapter weights are not a dict of tensors", file=path, input=index)
    return {name: TensorInfo(name, dtype, shape, PickledTensor(path), index) for name, (dtype, shape) in state.items()}
