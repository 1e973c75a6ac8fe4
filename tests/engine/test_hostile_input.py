"""Hostile inputs: files built to crash, hang or bloat the engine are refused while planning (`plan_merge`, the
API's preflight) with an InputError or UnsupportedOptionError whose attributes name the file, tensor, option
and input at fault, never with a raw Python exception. The service turns those into a 422 naming the request
field, where a raw exception would be a 500.

Each test breaks one thing in private copies of good inputs (`inputs`, see conftest). A few of these cases
also run through the command line, in test_bad_input's BAD_INPUTS.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import re
import shutil
import struct
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapter_merge.worker.engine import (
    AdapterSpec,
    InputError,
    MergeError,
    MergeOptions,
    UnsupportedOptionError,
    merge,
    plan_merge,
)
from adapter_merge.worker.engine.base_model import MAX_INDEX_BYTES
from adapter_merge.worker.engine.input_files import MAX_CONFIG_BYTES, InputFiles
from adapter_merge.worker.engine.module_patterns import MAX_KEY_CHARS, MAX_KEYS, ModulePatterns
from adapter_merge.worker.engine.safe_json import MAX_CONTAINERS, MAX_DEPTH, JsonError, parse_json
from adapter_merge.worker.engine.safetensors_format import MAX_HEADER_BYTES
from adapter_merge.worker.engine.side_files import write_side_files
from adapter_merge.worker.engine.tensor_io import legacy_state_dict
from tests.builders import edit_adapter_config
from tests.engine.conftest import Inputs, read_json
from tests.engine.test_bad_input import (
    ADAPTER_FILE,
    BASE_FILE,
    CONFIG_FILE,
    FACTS,
    Q_PROJ,
    _lora_key,
    _read_safetensors,
    _write_safetensors,
    to_legacy,
    zip_bomb,
)
from tests.oracle import load_dir_tensors

DEEP = 100_000
"""Nesting that makes Python's json raise RecursionError."""
HUGE_INT = "9" * 5000
"""Past CPython's 4300-digit limit on int(str)."""


def plan_error(base: Path, adapters: list[Path], options: MergeOptions | None = None,
               weights: list[float] | None = None) -> MergeError:
    """The error `plan_merge` raises; fails the test if it plans."""
    specs = [AdapterSpec(path, weight) for path, weight in zip(adapters, weights or [1.0] * len(adapters),
                                                                strict=True)]
    with pytest.raises(MergeError) as caught:
        plan_merge(base, specs, options)
    return caught.value


def assert_refused(error: MergeError, kind: type[MergeError], facts: dict[str, Any], *needles: str) -> None:
    """`error` is exactly of class `kind`, an input fault, with exactly `facts` (others None) and `needles`
    in its message."""
    assert type(error) is kind, repr(error)
    assert error.fault == "input"
    assert {name: getattr(error, name) for name in FACTS} == {name: facts.get(name) for name in FACTS}, str(error)
    for needle in needles:
        assert needle in str(error), str(error)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _write_config(adapter: Path, text: str) -> None:
    (adapter / CONFIG_FILE).write_text(text)


def _config_with(adapter: Path, field: str, raw_value: str) -> None:
    """adapter_config.json with one field set to raw JSON text (which json.dumps could not produce)."""
    config = json.loads((adapter / CONFIG_FILE).read_text())
    config[field] = "@@"
    _write_config(adapter, json.dumps(config).replace('"@@"', raw_value))


# --- 1. JSON files: size, nesting, number length ------------------------------------------------------------


def test_parse_json_limits() -> None:
    assert parse_json(b'{"a": [[1, 2.5, "x]]][[["], {"b": null}]}') == {"a": [[1, 2.5, "x]]][[["], {"b": None}]}
    assert parse_json(_deep(MAX_DEPTH).encode()) is not None
    for raw, words in [
        (_deep(MAX_DEPTH + 1), f"deeper than {MAX_DEPTH}"),
        (_deep(DEEP), f"deeper than {MAX_DEPTH}"),
        ('{"a": ' * DEEP + "1" + "}" * DEEP, f"deeper than {MAX_DEPTH}"),
        (f'{{"r": {HUGE_INT}}}', "number of 5000 characters"),
        (f'{{"a": 1.{HUGE_INT}}}', "number of 5002 characters"),
        ('{"a": [1, 2}', "not valid JSON"),
        ('{"a": "\\"]]]', "not valid JSON"),
        ("[" + "[]," * MAX_CONTAINERS + "[]]", f"more than the {MAX_CONTAINERS}"),
    ]:
        with pytest.raises(JsonError, match=re.escape(words)):
            parse_json(raw.encode())
    with pytest.raises(JsonError, match="UTF-8"):
        parse_json(b'{"a": "\xff"}')


def test_largest_too_deep_header_is_refused_quickly() -> None:
    """A header of the largest size read, of arrays nested one level too deep (up to the container limit): the
    nesting check is one linear pass, and the decoder that names the fault has bounded work."""
    unit = "[" * MAX_DEPTH + '"' + "x" * 3000 + '"' + "]" * MAX_DEPTH
    raw = ("[" + ",".join([unit] * (MAX_HEADER_BYTES // len(unit))) + "]").encode()
    started = time.perf_counter()
    with pytest.raises(JsonError, match="deeper than"):
        parse_json(raw)
    assert time.perf_counter() - started < 3


@pytest.mark.parametrize("text", [_deep(DEEP), f'{{"peft_type": "LORA", "r": {HUGE_INT}}}'], ids=["deep", "huge_int"])
def test_adapter_config_json_within_limits(inputs: Inputs, text: str) -> None:
    _write_config(inputs.lora, text)
    assert_refused(plan_error(inputs.base, [inputs.lora]), InputError, {"file": inputs.lora / CONFIG_FILE, "input": 0})


def test_base_config_too_large(inputs: Inputs) -> None:
    config = inputs.base / "config.json"
    config.write_text(config.read_text()[:-2] + " " * MAX_CONFIG_BYTES + "}\n")
    assert_refused(plan_error(inputs.base, [inputs.lora]), InputError, {"file": config, "input": "base"},
                   "more than the 16777216 bytes")


def _shard_base(inputs: Inputs) -> Path:
    """Turn the single-file base into one with a shard index; returns the index's path."""
    header, _ = _read_safetensors(inputs.base / BASE_FILE)
    (inputs.base / BASE_FILE).rename(inputs.base / "model-00001-of-00001.safetensors")
    index = inputs.base / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {
        name: "model-00001-of-00001.safetensors" for name in header if name != "__metadata__"}}))
    return index


@pytest.mark.parametrize("kind", ["too_large", "deep", "huge_int", "not_a_string"])
def test_shard_index_within_limits(inputs: Inputs, kind: str) -> None:
    index = _shard_base(inputs)
    assert plan_merge(inputs.base, [AdapterSpec(inputs.lora)]).shards
    facts: dict[str, Any] = {"file": index, "input": "base"}
    if kind == "too_large":
        with index.open("r+b") as handle:  # sparse: refused by its size, never read
            handle.truncate(MAX_INDEX_BYTES + 1)
    elif kind == "deep":
        index.write_text(json.dumps({"weight_map": {"a": "b"}, "metadata": "@@"}).replace('"@@"', _deep(DEEP)))
    elif kind == "huge_int":
        index.write_text(json.dumps({"weight_map": {"a": "b"}, "metadata": {"total_size": "@@"}}).replace(
            '"@@"', HUGE_INT))
    else:
        index.write_text(json.dumps({"weight_map": {f"{Q_PROJ}.weight": ["x"], "b": "c"}}))
        facts["tensor"] = f"{Q_PROJ}.weight"
    assert_refused(plan_error(inputs.base, [inputs.lora]), InputError, facts)


def _edit_header(path: Path, edit: Callable[[dict], None]) -> None:
    header, body = _read_safetensors(path)
    edit(header)
    _write_safetensors(path, header, body)


def _raw_header(path: Path, text: str) -> None:
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_safetensors_header_too_large(inputs: Inputs) -> None:
    """The header length says 64 MiB + 8 and the (sparse) file is that long: refused without reading it."""
    path = inputs.base / BASE_FILE
    with path.open("r+b") as handle:
        handle.write(struct.pack("<Q", MAX_HEADER_BYTES + 8))
        handle.truncate(MAX_HEADER_BYTES + 1024)
    assert_refused(plan_error(inputs.base, [inputs.lora]), InputError, {"file": path, "input": "base"},
                   f"larger than the {MAX_HEADER_BYTES} bytes")


@pytest.mark.parametrize("text", [
    '{"t": {"dtype": "F32", "shape": ' + _deep(DEEP) + ', "data_offsets": [0, 0]}}',
    '{"t": {"dtype": "F32", "shape": [0], "data_offsets": [0, ' + HUGE_INT + "]}}",
], ids=["deep", "huge_int"])
def test_safetensors_header_json_within_limits(inputs: Inputs, text: str) -> None:
    path = inputs.lora / ADAPTER_FILE
    _raw_header(path, text)
    assert_refused(plan_error(inputs.base, [inputs.lora]), InputError, {"file": path, "input": 0})


KEY = _lora_key(Q_PROJ, "lora_A.weight")


@pytest.mark.parametrize(("field", "value"), [
    ("shape", [2**63, 0]),  # beyond int64, and no bytes: the span check alone would pass it
    ("shape", [0, 2**40, 2**40]),  # each fits, the element count does not
    ("shape", [True, 4]),
    ("shape", "ab"),
    ("shape", [1] * 33),
    ("data_offsets", [0, 2**64]),
    ("data_offsets", [-8, 0]),
    ("dtype", ["F32"]),
])
def test_safetensors_entry_out_of_range(inputs: Inputs, field: str, value: object) -> None:
    path = inputs.lora / ADAPTER_FILE
    _edit_header(path, lambda header: header[KEY].__setitem__(field, value))
    assert_refused(plan_error(inputs.base, [inputs.lora]), InputError, {"file": path, "input": 0, "tensor": KEY})


def test_safetensors_tensor_name_too_long(inputs: Inputs) -> None:
    path = inputs.lora / ADAPTER_FILE
    _edit_header(path, lambda header: header.__setitem__("x" * 5000, header.pop(KEY)))
    error = plan_error(inputs.base, [inputs.lora])
    assert_refused(error, InputError, {"file": path, "input": 0}, "longer than 1024 characters")
    assert len(str(error)) < 500


def test_messages_quote_values_briefly(inputs: Inputs) -> None:
    """A refused value is quoted in the message, cut short: a 422 does not echo a megabyte of config."""
    _config_with(inputs.lora, "rank_pattern", json.dumps(list(range(100_000))))
    error = plan_error(inputs.base, [inputs.lora])
    assert_refused(error, InputError, {"file": inputs.lora / CONFIG_FILE, "option": "rank_pattern", "input": 0})
    assert len(str(error)) < 500


def test_safetensors_metadata_must_be_strings(inputs: Inputs) -> None:
    path = inputs.lora / ADAPTER_FILE
    _edit_header(path, lambda header: header.__setitem__("__metadata__", {"format": ["pt"]}))
    assert_refused(plan_error(inputs.base, [inputs.lora]), InputError, {"file": path, "input": 0})


# --- 2. numbers out of range ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "raw", "option"), [
    ("lora_alpha", "1e308", "lora_alpha"),  # finite, but alpha/r does not fit float32
    ("lora_alpha", "NaN", "lora_alpha"),
    ("lora_alpha", "Infinity", "lora_alpha"),
    ("lora_alpha", '"16"', "lora_alpha"),
    ("lora_alpha", "true", "lora_alpha"),
    ("alpha_pattern", '{"q_proj": 1e300}', "alpha_pattern"),
    ("r", "0", "r"),
    ("r", "-4", "r"),
    ("r", "4.0", "r"),
    ("r", "true", "r"),
    ("r", str(2**70), "r"),
    ("rank_pattern", '{"q_proj": 0}', "rank_pattern"),
    ("rank_pattern", '{"q_proj": "8"}', "rank_pattern"),
])
def test_numbers_out_of_range(inputs: Inputs, field: str, raw: str, option: str) -> None:
    _config_with(inputs.lora, field, raw)
    assert_refused(plan_error(inputs.base, [inputs.lora]), InputError,
                   {"file": inputs.lora / CONFIG_FILE, "option": option, "input": 0}, option)


def test_weight_times_scale_beyond_float32(inputs: Inputs) -> None:
    """alpha/r = 2 is fine, and so is a weight of 3e38; their product is not a float32."""
    assert_refused(plan_error(inputs.base, [inputs.dora, inputs.lora], weights=[1.0, 3e38]), InputError,
                   {"option": "weights", "input": 1}, "float32")
    assert_refused(plan_error(inputs.base, [inputs.lora], weights=[1e39]), InputError,
                   {"option": "weights", "input": 0})


def test_large_but_representable_scale_still_plans(inputs: Inputs) -> None:
    edit_adapter_config(inputs.lora, lora_alpha=1e38)  # scale 2.5e37: finite in float32
    assert plan_merge(inputs.base, [AdapterSpec(inputs.lora)]).summary()["tensors_merged"] > 0


@pytest.mark.parametrize("shape", [(), (4,)], ids=["0-d", "1-d"])
def test_lora_factor_of_too_few_dimensions(inputs: Inputs, shape: tuple[int, ...]) -> None:
    path = inputs.lora / ADAPTER_FILE
    tensors = load_file(path)
    tensors[KEY] = torch.zeros(shape)
    save_file(tensors, path)
    assert_refused(plan_error(inputs.base, [inputs.lora]), InputError, {"file": path, "input": 0, "tensor": KEY},
                   "at least 2 dimensions")


@pytest.mark.parametrize("dtype", [torch.int32, torch.float8_e4m3fn])
def test_lora_factor_that_is_not_float(inputs: Inputs, dtype: torch.dtype) -> None:
    path = inputs.lora / ADAPTER_FILE
    tensors = load_file(path)
    tensors[KEY] = tensors[KEY].to(dtype)
    save_file(tensors, path)
    assert_refused(plan_error(inputs.base, [inputs.lora]), InputError, {"file": path, "input": 0, "tensor": KEY})


def test_replacement_tensor_in_fp8(inputs: Inputs) -> None:
    path = inputs.lora / ADAPTER_FILE
    tensors = load_file(path)
    tensors["base_model.model.model.norm.weight"] = torch.ones(32, dtype=torch.float8_e4m3fn)
    save_file(tensors, path)
    assert_refused(plan_error(inputs.base, [inputs.lora]), UnsupportedOptionError,
                   {"file": path, "input": 0, "tensor": "base_model.model.model.norm.weight"}, "fp8")


# --- 3. config types ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "raw"), [
    ("rank_pattern", "[1, 2]"),
    ("rank_pattern", '"q_proj"'),
    ("alpha_pattern", '["x"]'),
    ("alpha_pattern", '{"q_proj": "x"}'),
    ("alpha_pattern", '{"q_proj": [1]}'),
    ("trainable_token_indices", '"ab"'),
    ("trainable_token_indices", '[1, "a"]'),
    ("trainable_token_indices", "[1.5]"),
    ("trainable_token_indices", "[true]"),
    ("trainable_token_indices", "[-1]"),
    ("trainable_token_indices", '{"embed_tokens": 5}'),
    ("trainable_token_indices", '{"embed_tokens": ["a"]}'),
    ("trainable_token_indices", "7"),
])
def test_config_option_of_the_wrong_type(inputs: Inputs, field: str, raw: str) -> None:
    _config_with(inputs.lora, field, raw)
    assert_refused(plan_error(inputs.base, [inputs.lora]), InputError,
                   {"file": inputs.lora / CONFIG_FILE, "option": field, "input": 0}, field)


# --- 4. regexes from adapter configs ----------------------------------------------------------------------------


def _backtracking_pair(folder: Path) -> tuple[Path, Path]:
    """A base whose one module is `model.` + 40 `a`s, and an adapter whose alpha_pattern `(a+)+c` makes a
    backtracking engine try every way to split the run (hours with Python's re)."""
    module = "model." + "a" * 40
    base, adapter = folder / "base", folder / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    save_file({f"{module}.weight": torch.ones(4, 4)}, str(base / BASE_FILE))
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({f"base_model.model.{module}.lora_A.weight": torch.ones(2, 4),
               f"base_model.model.{module}.lora_B.weight": torch.ones(4, 2)}, str(adapter / ADAPTER_FILE))
    (adapter / CONFIG_FILE).write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "alpha_pattern": {"(a+)+c": 1, "a+": 6}}))
    return base, adapter


def test_backtracking_pattern_is_matched_in_linear_time(tmp_path: Path) -> None:
    base, adapter = _backtracking_pair(tmp_path)
    started = time.perf_counter()
    plan = plan_merge(base, [AdapterSpec(adapter)])
    assert time.perf_counter() - started < 2
    (op,) = plan.outputs[0].ops
    assert op.scale == 3.0  # type: ignore[attr-defined]  # "(a+)+c" does not match; "a+" does: alpha 6 / r 2


@pytest.mark.parametrize(("field", "key"), [
    ("rank_pattern", "(?=q)q_proj"),  # lookahead
    ("alpha_pattern", "(?<!k)q_proj"),  # lookbehind
    ("alpha_pattern", r"(q)\1_proj"),  # backreference
    ("rank_pattern", "q_proj["),  # invalid
    ("alpha_pattern", "(a{1000}){1000}"),  # beyond RE2's repetition limit
])
def test_pattern_re2_cannot_match(inputs: Inputs, field: str, key: str) -> None:
    edit_adapter_config(inputs.lora, **{field: {"v_proj": 4 if field == "rank_pattern" else 2.0, key: 4}})
    assert_refused(plan_error(inputs.base, [inputs.lora]), InputError,
                   {"file": inputs.lora / CONFIG_FILE, "option": field, "input": 0}, repr(key))


def test_trainable_token_pattern_re2_cannot_match(inputs: Inputs) -> None:
    edit_adapter_config(inputs.lora, trainable_token_indices={"(?=e)embed_tokens": [1]})
    assert_refused(plan_error(inputs.base, [inputs.lora]), InputError,
                   {"file": inputs.lora / CONFIG_FILE, "option": "trainable_token_indices", "input": 0})


@pytest.mark.parametrize("patterns", [
    {f"layers\\.{i}\\.q_proj": 4 for i in range(MAX_KEYS + 1)},
    {"q" * (MAX_KEY_CHARS + 1): 4},
], ids=["too_many_keys", "key_too_long"])
def test_pattern_count_and_length_are_bounded(inputs: Inputs, patterns: dict[str, int]) -> None:
    edit_adapter_config(inputs.lora, rank_pattern=patterns)
    assert_refused(plan_error(inputs.base, [inputs.lora]), InputError,
                   {"file": inputs.lora / CONFIG_FILE, "option": "rank_pattern", "input": 0})


@pytest.mark.parametrize("keys", [
    ["q_proj", r"layers\.0\.self_attn\.q_proj"],
    [r"layers\.0\.self_attn\.q_proj", "q_proj"],
    [r"layers\.1\.mlp\.\w+_proj", r"layers\.0\..*", "(q|k|v)_proj", "model.layers.0.self_attn.k_proj"],
    ["proj", "_proj", "self_attn", r"\d+\.mlp\.down_proj", "layers.[01].mlp.up_proj", r"^model\.layers\.1\.mlp"],
    ["a)|(q_proj"],  # closes PEFT's group early: still the same meaning as in Python's re
])
def test_patterns_match_as_peft_does(keys: list[str]) -> None:
    """The first key in JSON order whose `(.*\\.)?(key)$` matches from the start, as PEFT's get_pattern_key."""
    modules = [f"model.layers.{layer}.{block}.{name}" for layer in (0, 1)
               for block, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                    ("mlp", ("gate_proj", "up_proj", "down_proj")))
               for name in names] + ["lm_head", "model.embed_tokens", "q_proj"]
    patterns = ModulePatterns("rank_pattern", dict.fromkeys(keys, 1), Path("adapter_config.json"), 0)
    for module in modules:
        peft = next((key for key in keys if re.match(rf"(.*\.)?({key})$", module)), None)
        assert patterns.key(module) == peft, module


# --- 5. legacy .bin adapters --------------------------------------------------------------------------------------


class _FakeStorage:
    """Pickled as torch's persistent storage id, whatever it claims."""

    def __init__(self, *pid: object) -> None:
        self.pid = pid


class _FakeTensor:
    """Pickled as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...), whatever they are."""

    def __init__(self, storage: _FakeStorage, offset: object, size: object, stride: object) -> None:
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self) -> tuple[Any, ...]:
        return torch._utils._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> object:
        return obj.pid if isinstance(obj, _FakeStorage) else None


def write_legacy(path: Path, state: dict[object, object], records: dict[str, bytes],
                 compress: int = zipfile.ZIP_STORED) -> None:
    """A torch.save-style zip: data.pkl (pickled with the fakes above) and one record per storage."""
    import io

    pickled = io.BytesIO()
    _Pickler(pickled, protocol=2).dump(collections.OrderedDict(state))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled.getvalue())
        for key, data in records.items():
            archive.writestr(f"archive/data/{key}", data, compress_type=compress)
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/byteorder", "little")


FLOATS = torch.FloatStorage
SIX_FLOATS = bytes(24)


@pytest.mark.parametrize(("state", "records", "needle"), [
    ({KEY: _FakeTensor(_FakeStorage("storage", "XYZ", "0", "cpu", 6), 0, (2, 3), (3, 1))}, {"0": SIX_FLOATS},
     "unknown dtype"),
    ({KEY: _FakeTensor(_FakeStorage("storage", FLOATS, "0", "cpu", 6), 0, "ab", (3, 1))}, {"0": SIX_FLOATS},
     "tensor size 'ab'"),
    ({KEY: _FakeTensor(_FakeStorage("storage", FLOATS, "0", "cpu", 6), 0, (2**62, 2**62), (1, 1))},
     {"0": SIX_FLOATS}, "int64"),
    ({KEY: _FakeTensor(_FakeStorage("storage", FLOATS, "0", "cpu", 6), 0, (100, 100), (100, 1))},
     {"0": SIX_FLOATS}, "does not fit its storage"),
    ({KEY: _FakeTensor(_FakeStorage("storage", FLOATS, "0", "cpu", 10**12), 0, (2, 3), (3, 1))},
     {"0": SIX_FLOATS}, "storage '0'"),  # claims 4 TB of record
    ({KEY: _FakeTensor(_FakeStorage("storage", FLOATS, "1", "cpu", 6), 0, (2, 3), (3, 1))}, {"0": SIX_FLOATS},
     "storage '1'"),  # no such record
    ({KEY: _FakeTensor(_FakeStorage("storage", FLOATS, "0", "cpu", -6), 0, (2, 3), (3, 1))}, {"0": SIX_FLOATS},
     "invalid key or size"),
    ({KEY: _FakeTensor(_FakeStorage("disk", FLOATS, "0", "cpu", 6), 0, (2, 3), (3, 1))}, {"0": SIX_FLOATS},
     "not a storage"),
    ({7: _FakeTensor(_FakeStorage("storage", FLOATS, "0", "cpu", 6), 0, (2, 3), (3, 1))}, {"0": SIX_FLOATS},
     "not a dict of tensors"),
], ids=["dtype_XYZ", "string_shape", "shape_beyond_int64", "view_outside_storage", "storage_claims_4TB",
        "storage_missing", "negative_numel", "not_a_storage", "key_not_a_string"])
def test_legacy_adapter_claims_are_checked(inputs: Inputs, state: dict, records: dict, needle: str) -> None:
    path = to_legacy(inputs.lora)
    write_legacy(path, state, records)
    assert_refused(plan_error(inputs.base, [inputs.lora]), InputError, {"file": path, "input": 0}, needle)


def test_legacy_adapter_with_compressed_storage(inputs: Inputs) -> None:
    """torch.save stores storages uncompressed; a deflated one could inflate to anything in torch.load."""
    path = to_legacy(inputs.lora)
    write_legacy(path, {KEY: _FakeTensor(_FakeStorage("storage", FLOATS, "0", "cpu", 6), 0, (2, 3), (3, 1))},
                 {"0": SIX_FLOATS}, compress=zipfile.ZIP_DEFLATED)
    assert_refused(plan_error(inputs.base, [inputs.lora]), InputError, {"file": path, "input": 0}, "uncompressed")


def test_legacy_adapter_zip_bomb(inputs: Inputs) -> None:
    path = to_legacy(inputs.lora)
    zip_bomb(path)
    assert path.stat().st_size < 10_000
    assert_refused(plan_error(inputs.base, [inputs.lora]), InputError, {"file": path, "input": 0},
                   "data.pkl claims 2147483648 bytes")


def test_legacy_adapter_is_checked_again_when_loaded(inputs: Inputs) -> None:
    """The merge's torch.load reads the file only after the same checks pass on the descriptor it loads."""
    path = to_legacy(inputs.lora)
    assert legacy_state_dict(path, 0, InputFiles(None)).keys() == torch.load(path, weights_only=True).keys()
    zip_bomb(path)
    with pytest.raises(InputError) as caught:
        legacy_state_dict(path, 0, InputFiles(None))
    assert_refused(caught.value, InputError, {"file": path, "input": 0}, "data.pkl claims")


def test_well_formed_fake_pickle_plans_and_loads(inputs: Inputs) -> None:
    """Control for the fakes above: a legacy file written by `write_legacy` with honest claims is planned, and
    loads in torch to what the planner read."""
    path = to_legacy(inputs.lora)
    real = torch.load(path, weights_only=True)
    storages = {name: _FakeStorage("storage", FLOATS, str(n), "cpu", t.numel()) for n, (name, t) in
                enumerate(real.items())}
    write_legacy(path, {name: _FakeTensor(storages[name], 0, tuple(t.shape), t.stride()) for name, t in real.items()},
                 {storage.pid[2]: real[name].contiguous().numpy().tobytes() for name, storage in storages.items()})
    assert plan_merge(inputs.base, [AdapterSpec(inputs.lora)]).summary()["tensors_merged"] > 0
    loaded = legacy_state_dict(path, 0, InputFiles(None))
    assert all(torch.equal(loaded[name], real[name]) for name in real)


# --- 6. only regular files inside the allowed roots ----------------------------------------------------------


def _roots(inputs: Inputs) -> MergeOptions:
    return MergeOptions(allowed_roots=(inputs.base.parent,))


def _outside(inputs: Inputs, name: str, text: str = "outside\n") -> Path:
    outside = inputs.out_parent.parent / "outside"
    outside.mkdir(exist_ok=True)
    (outside / name).write_text(text)
    return outside / name


def _link(path: Path, target: Path) -> None:
    path.unlink()
    path.symlink_to(target)


@pytest.mark.parametrize(("folder", "name", "input"), [
    ("base", "tokenizer.json", "base"),
    ("base", "config.json", "base"),
    ("base", BASE_FILE, "base"),
    ("lora", CONFIG_FILE, 0),
    ("lora", ADAPTER_FILE, 0),
])
def test_link_leading_outside_the_roots(inputs: Inputs, folder: str, name: str, input: object) -> None:
    """A link to another model outside the roots, or to a server file, is refused while planning, naming the
    link; without roots (the command line) the same inputs plan."""
    path = getattr(inputs, folder) / name
    target = _outside(inputs, name)
    shutil.copyfile(path, target)  # a real file of the right kind: only where it lies is wrong
    _link(path, target)
    assert plan_merge(inputs.base, [AdapterSpec(inputs.lora)])
    assert_refused(plan_error(inputs.base, [inputs.lora], _roots(inputs)), InputError, {"file": path, "input": input},
                   "outside the allowed folders")


def test_link_to_etc_passwd(inputs: Inputs) -> None:
    path = inputs.base / "tokenizer.json"
    _link(path, Path("/etc/passwd"))
    error = plan_error(inputs.base, [inputs.lora], _roots(inputs))
    assert_refused(error, InputError, {"file": path, "input": "base"})
    assert "/etc/passwd" not in str(error)


def test_fifo_is_never_opened_for_reading(inputs: Inputs) -> None:
    """A FIFO would block a reader forever: it is not a regular file, so it is neither read nor copied."""
    fifo = inputs.base / "tokenizer.model"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        InputFiles(None).open(fifo, "base")
    assert "tokenizer.model" not in plan_merge(inputs.base, [AdapterSpec(inputs.lora)], _roots(inputs)).side_files


def test_side_file_swapped_after_planning(inputs: Inputs) -> None:
    """The copy opens and checks the file again: a link swapped in after planning leaks nothing."""
    plan = plan_merge(inputs.base, [AdapterSpec(inputs.lora)], _roots(inputs))
    _link(inputs.base / "tokenizer.json", _outside(inputs, "tokenizer.json", "secret\n"))
    inputs.out.mkdir()
    with pytest.raises(InputError) as caught:
        write_side_files(inputs.out, plan.config, plan.shard_index(), plan.side_files, plan.files)
    assert_refused(caught.value, InputError, {"file": inputs.base / "tokenizer.json", "input": "base"})
    assert not any("secret" in p.read_text() for p in inputs.out.iterdir() if p.is_file())


def _hub_cache(source: Path, repo: Path) -> Path:
    """`source` laid out as the Hugging Face cache does: snapshots/<rev>/<file> -> ../../blobs/<sha256>."""
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for path in sorted(source.iterdir()):
        blob = repo / "blobs" / f"{len(list((repo / 'blobs').iterdir())):04d}{path.name.encode().hex()[:16]}"
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snapshot


def test_hub_cache_links_within_the_roots_merge(inputs: Inputs, tmp_path: Path) -> None:
    """Links inside the roots are followed: the cached copies merge to the same bytes as the plain folders, and
    the manifest names the inputs relative to the root, with no host name."""
    root = tmp_path / "hub"
    base = _hub_cache(inputs.base, root / "models--tiny--base")
    lora = _hub_cache(inputs.lora, root / "models--tiny--lora")
    merge(base, [AdapterSpec(lora)], inputs.out, MergeOptions(allowed_roots=(root,)))
    plain = tmp_path / "plain"
    merge(inputs.base, [AdapterSpec(inputs.lora)], plain)
    ours, theirs = load_dir_tensors(inputs.out), load_dir_tensors(plain)
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (inputs.out / "tokenizer.json").read_bytes() == (inputs.base / "tokenizer.json").read_bytes()
    manifest = read_json(inputs.out / "merge_manifest.json")
    assert manifest["base"]["path"] == "models--tiny--base/snapshots/0123abcd"
    assert [adapter["path"] for adapter in manifest["adapters"]] == ["models--tiny--lora/snapshots/0123abcd"]
    assert "host" not in manifest
    assert str(tmp_path) not in json.dumps(manifest)
    assert {entry["path"] for entry in manifest["base"]["files"]} == {p.name for p in inputs.base.iterdir()}
