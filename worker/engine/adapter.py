"""A PEFT LoRA adapter folder: its config (checked for options we refuse), scaling rules and tensor keys."""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, TypeVar

from adapter_merge.worker.engine.errors import InputError, UnsupportedOptionError, brief
from adapter_merge.worker.engine.folder_kind import ADAPTER_MARKER, require_model_folder
from adapter_merge.worker.engine.input_files import InputFiles
from adapter_merge.worker.engine.module_patterns import ModulePatterns
from adapter_merge.worker.engine.safetensors_format import (
    INT64_MAX,
    MAX_HEADER_BYTES,
    MAX_NAME_CHARS,
    is_int64,
    read_header,
    shape_problem,
)
from adapter_merge.worker.engine.tensor_info import DTYPE_SIZES, PickledTensor, TensorInfo

T = TypeVar("T")

SAFETENSORS_FILE = "adapter_model.safetensors"
LEGACY_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
FP32_MAX = 3.4028234663852886e38
"""The largest finite float32: a scale beyond it is infinite in the fp32 arithmetic of the merge."""

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
    rank_pattern: ModulePatterns[int]
    alpha_pattern: ModulePatterns[float]
    trainable_token_indices: list[int] | ModulePatterns[list[int]] | None

    def scaling(self, module_path: str) -> float:
        """PEFT's scale for one module: rank and alpha looked up separately in their patterns."""
        rank = self.rank(module_path)
        alpha = self.alpha_pattern.lookup(module_path, self.alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def alpha_option(self, module_path: str) -> str:
        """The option that sets the module's alpha: alpha_pattern or lora_alpha."""
        return "lora_alpha" if self.alpha_pattern.key(module_path) is None else "alpha_pattern"

    def rank(self, module_path: str) -> int:
        return self.rank_pattern.lookup(module_path, self.r)

    def token_indices(self, module_path: str) -> list[int]:
        indices = self.trainable_token_indices
        if isinstance(indices, ModulePatterns):
            key = indices.key(module_path)
            if key is None:
                raise self._token_indices_error(f"trainable_token_indices names no entry for {module_path!r}")
            indices = indices.values[key]
        if not indices:
            raise self._token_indices_error(
                f"{module_path!r} has trainable tokens but trainable_token_indices is empty")
        return list(indices)

    def _token_indices_error(self, detail: str) -> InputError:
        return InputError(f"{self.path}: {detail}", file=self.path, option="trainable_token_indices", input=self.index)


@dataclass(frozen=True)
class Adapter:
    root: Path
    index: int
    """Position in the requested order; names the adapter in messages as well as the path."""
    weight: float
    config: AdapterConfig
    weights_file: Path
    tensors: dict[str, TensorInfo] = field(repr=False)
    shown: str = ""
    """How messages that outlive the merge (notes, the manifest) name the folder; see `InputFiles.shown`."""

    @property
    def label(self) -> str:
        return f"adapter {self.index + 1} ({self.shown or self.root})"


def load_adapter(root: Path, index: int, weight: float, files: InputFiles) -> Adapter:
    """Adapter `index` of the requested order: its config and its tensors' headers (no tensor data)."""
    require_model_folder(root, index)
    if not math.isfinite(weight) or abs(weight) > FP32_MAX:
        raise InputError(f"{root}: adapter weight {weight} is not a finite float32 number", option="weights",
                         input=index)
    config = parse_config(root / ADAPTER_MARKER, index, files)
    if (root / SAFETENSORS_FILE).is_file():
        weights_file = root / SAFETENSORS_FILE
        tensors = read_header(weights_file, index, files).tensors
    elif (root / LEGACY_FILE).is_file():
        weights_file = root / LEGACY_FILE
        with files.open(weights_file, index) as handle:
            tensors = legacy_tensor_infos(weights_file, handle, index)
    else:
        raise InputError(f"{root}: no {SAFETENSORS_FILE} (or legacy {LEGACY_FILE}) in the adapter folder",
                         file=root, input=index)
    if not tensors:
        raise InputError(f"{weights_file}: adapter has no tensors", file=weights_file, input=index)
    for name in tensors:
        if not name.startswith(KEY_PREFIX):
            raise InputError(f"{weights_file}: tensor {name!r} does not start with {KEY_PREFIX!r}",
                             file=weights_file, tensor=name, input=index)
    return Adapter(root=root, index=index, weight=weight, config=config, weights_file=weights_file, tensors=tensors,
                   shown=files.shown(root))


def parse_config(path: Path, index: int, files: InputFiles) -> AdapterConfig:
    """Adapter `index`'s adapter_config.json, refusing the options whose merge would be wrong and values of
    the wrong type or range."""
    raw = files.read_json(path, "adapter config", index)

    def refuse(option: str, detail: str) -> UnsupportedOptionError:
        return UnsupportedOptionError(f"{path}: {detail}", file=path, option=option, input=index)

    if raw.get("peft_type") != "LORA":
        raise refuse("peft_type", f"peft_type {brief(raw.get('peft_type'))} is not supported (only LORA)")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise refuse("init_lora_weights",
                     f"init_lora_weights={brief(init)} rewrites the base model at load time and is not supported")
    for option in _REFUSED_OPTIONS:
        if raw.get(option):
            raise refuse(option, f"option {option}={brief(raw[option])} is not supported")
    if raw.get("use_dora") and raw.get("lora_bias"):
        raise refuse("use_dora", "use_dora together with lora_bias is not supported")

    def value(option: str, convert: Callable[[], T]) -> T:
        """One option's value; a value of the wrong type or range is an error naming the option."""
        try:
            return convert()
        except (TypeError, ValueError) as error:
            raise InputError(f"{path}: {error}", file=path, option=option, input=index) from error

    def patterns(option: str, check: Callable[[Any, str], T]) -> ModulePatterns[T]:
        table = value(option, lambda: {key: check(item, f"{option}[{key!r}]")
                                       for key, item in _object(raw.get(option), option).items()})
        return ModulePatterns(option, table, path, index)

    def token_indices() -> list[int] | ModulePatterns[list[int]] | None:
        """Absent, a list of token indices, or an object of module patterns to such lists."""
        option, indices = "trainable_token_indices", raw.get("trainable_token_indices")
        if indices is None:
            return None
        if isinstance(indices, dict):
            return patterns(option, _indices)
        return value(option, lambda: _indices(indices, option))

    return AdapterConfig(
        path=path,
        index=index,
        raw=raw,
        r=value("r", lambda: _positive_int(raw.get("r"), "r")),
        alpha=value("lora_alpha", lambda: _finite_number(raw.get("lora_alpha", 8), "lora_alpha")),
        use_rslora=bool(raw.get("use_rslora", False)),
        use_dora=bool(raw.get("use_dora", False)),
        rank_pattern=patterns("rank_pattern", _positive_int),
        alpha_pattern=patterns("alpha_pattern", _finite_number),
        trainable_token_indices=token_indices(),
    )


def _object(value: Any, option: str) -> dict[str, Any]:
    """A pattern option: a JSON object (absent or null is an empty one)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"option {option} must be an object of module patterns, got {brief(value)}")
    return value


def _positive_int(value: Any, option: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= INT64_MAX:
        raise ValueError(f"option {option} must be a positive integer, got {brief(value)}")
    return value


def _finite_number(value: Any, option: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"option {option} must be a finite number, got {brief(value)}")
    return float(value)


def _indices(value: Any, option: str) -> list[int]:
    if not isinstance(value, list) or not all(is_int64(index) for index in value):
        raise ValueError(f"option {option} must be a list of token indices (non-negative integers), got {brief(value)}")
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
MAX_PICKLE_BYTES = MAX_HEADER_BYTES
"""data.pkl of a legacy adapter says what a safetensors header says, in about as many bytes: the same limit."""
MAX_ARCHIVE_DIRECTORY_BYTES = 16 * 2**20
"""The zip's central directory, about 100 bytes per record (two per tensor): room for 80,000 tensors."""


@dataclass(frozen=True)
class _Storage:
    """What the pickle says of one storage: its dtype, its record in the archive, its number of elements."""

    dtype: str
    key: str
    numel: int


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    shape: tuple[int, ...]


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_rest: object) -> _Tensor:
    """torch._utils._rebuild_tensor_v2, reduced to checks: sizes torch can hold, a view inside its storage."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor storage is {type(storage).__name__}, not a storage")
    for what, dims in (("size", size), ("strides", stride)):
        if (problem := shape_problem(dims)) is not None:
            raise pickle.UnpicklingError(f"tensor {what} {brief(dims)} {problem}")
    if not is_int64(offset) or len(stride) != len(size):
        raise pickle.UnpicklingError(f"tensor offset {brief(offset)} or strides {brief(stride)} do not fit "
                                     f"size {brief(size)}")
    if math.prod(size) and offset + sum((n - 1) * step for n, step in zip(size, stride, strict=True)) >= storage.numel:
        raise pickle.UnpicklingError(f"a tensor of size {list(size)} at offset {offset} does not fit its storage "
                                     f"of {storage.numel} elements")
    return _Tensor(storage, tuple(size))


def _parameter(data: object, *_rest: object) -> object:
    return data


class _HeaderUnpickler(pickle.Unpickler):
    """Reads names, dtypes and shapes from torch's zip-pickle format without torch and without running
    anything: only the few globals a saved state dict uses are allowed, and storages are never loaded."""

    _ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in adapter weights")

    def persistent_load(self, pid: Any) -> _Storage:
        """('storage', <dtype code from find_class>, key, location, numel), checked."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"persistent id {brief(pid)} is not a storage")
        _, dtype, key, _location, numel = pid
        if dtype not in _STORAGE_DTYPES.values() or not isinstance(key, str) or not is_int64(numel):
            raise pickle.UnpicklingError(f"storage {brief(pid)} has an unknown dtype, or an invalid key or size")
        return _Storage(dtype, key, numel)


def legacy_tensor_infos(path: Path, handle: BinaryIO, index: int) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of adapter `index`'s legacy `adapter_model.bin` (open as `handle`), read
    torch-free so planning stays torch-free.

    Nothing is allocated on the archive's word: data.pkl is read only if its declared size is within
    MAX_PICKLE_BYTES (a zip bomb of a few KB may claim gigabytes), and every storage must be an uncompressed
    record whose size matches what the pickle says of it, so the `torch.load(weights_only=True)` of the
    merge reads no more than the file holds. The merge calls this again, on the file it then loads.
    """
    def refuse(detail: str) -> InputError:
        return InputError(f"{path}: not a readable PyTorch state dict ({detail})", file=path, input=index)

    try:
        file_size = os.fstat(handle.fileno()).st_size
        # ZipFile reads the central directory whole: bound its size first, from the end record as zipfile
        # itself finds it (a private helper, stable since Python 2).
        end_record = zipfile._EndRecData(handle)
        if end_record is None:
            raise refuse("not a zip archive")
        if (directory_bytes := end_record[zipfile._ECD_SIZE]) > MAX_ARCHIVE_DIRECTORY_BYTES:
            raise refuse(f"its zip directory claims {directory_bytes} bytes, more than {MAX_ARCHIVE_DIRECTORY_BYTES}")
        with zipfile.ZipFile(handle) as archive:
            members = {info.filename: info for info in archive.infolist()}
            pickled = next((info for name, info in members.items() if name.endswith("/data.pkl")), None)
            if pickled is None:
                raise refuse("no data.pkl")
            if pickled.file_size > MAX_PICKLE_BYTES:
                raise refuse(f"data.pkl claims {pickled.file_size} bytes, more than the {MAX_PICKLE_BYTES} "
                             f"this engine reads")
            with archive.open(pickled) as data:
                state = _HeaderUnpickler(io.BytesIO(data.read(MAX_PICKLE_BYTES + 1))).load()
    except InputError:
        raise
    except Exception as error:  # a hostile pickle or zip can raise almost anything; all of it means "bad file"
        raise refuse(str(error) or type(error).__name__) from error
    named = isinstance(state, dict) and all(isinstance(k, str) and len(k) <= MAX_NAME_CHARS for k in state)
    if not (named and all(isinstance(v, _Tensor) for v in state.values())):
        raise InputError(f"{path}: legacy adapter weights are not a dict of tensors with names of at most "
                         f"{MAX_NAME_CHARS} characters", file=path, input=index)
    prefix = pickled.filename.removesuffix("data.pkl")
    for storage in {tensor.storage for tensor in state.values()}:
        record = members.get(f"{prefix}data/{storage.key}")
        size = storage.numel * DTYPE_SIZES[storage.dtype]
        if (record is None or record.compress_type != zipfile.ZIP_STORED or record.file_size != size
                or record.header_offset + size > file_size):
            raise refuse(f"storage {storage.key!r} is not an uncompressed record of {size} bytes in the file")
    return {name: TensorInfo(name, tensor.storage.dtype, tensor.shape, PickledTensor(path), index)
            for name, tensor in state.items()}
