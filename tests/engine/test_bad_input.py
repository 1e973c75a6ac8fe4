"""Bad inputs: exit 1 with one error line naming the culprit, the right error with the right facts, no output.

Each test copies pristine, known-good inputs (the control test proves they merge), breaks one thing in the
files and runs `adapter-merge merge` in process (`cli.main.main`), as a user would, and the same call through
the Python API, where the error's class, stage and attributes are checked. A few cases also go through the
real command line in a subprocess, for the exit code and what reaches stderr.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapter_merge.cli.main import build_parser, main
from adapter_merge.cli.merge import merge_call
from adapter_merge.worker.engine import (
    InputError,
    MergeCancelled,
    MergeError,
    MergeOptions,
    NumericError,
    OutputExistsError,
    StorageError,
    UnsupportedOptionError,
    merge,
    parse_size,
    plan_merge,
)
from adapter_merge.worker.engine import side_files as engine_side_files
from adapter_merge.worker.engine import writer as engine_writer
from tests.builders import CASES, edit_adapter_config
from tests.engine.conftest import Inputs, Workspace
from tests.oracle import load_dir_tensors

REPO = Path(__file__).resolve().parents[2]
ERROR_PREFIX = "adapter-merge: error: "
BASE_FILE, ADAPTER_FILE, CONFIG_FILE, LEGACY_FILE = (
    "model.safetensors", "adapter_model.safetensors", "adapter_config.json", "adapter_model.bin")
Q_PROJ = "model.layers.0.self_attn.q_proj"
FACTS = ("file", "tensor", "option", "input")
"""The attributes every MergeError carries."""


@dataclass(frozen=True)
class Refusal:
    """What one broken input must produce: the command line's arguments (besides --out), words its one error
    line names, and the error the engine raises: its class, where it is raised and its attributes."""

    args: list[Path | str]
    needles: tuple[str, ...]
    error: type[MergeError]
    stage: Literal["plan", "merge"]
    """Raised by the preflight `plan_merge`, or by `merge` (bad arguments are usage errors: test_cli.py)."""
    facts: dict[str, Any] = field(default_factory=dict)
    """Expected attributes; every other one of FACTS must be None."""


def run_main(args: list[Path | str], out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`adapter-merge merge ARGS --out OUT --quiet` in this process: the exit code and stderr."""
    code = main(["merge", *map(str, args), "--out", str(out), "--quiet"])
    return code, capsys.readouterr().err


def run_cli(*args: str | Path, out: Path, timeout: int = 300,
            preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    """The same through the real command line, in a fresh interpreter."""
    env = {**os.environ, "ADAPTER_MERGE_CACHE": str(out.parent.parent / "checksum-cache")}
    command = [sys.executable, "-m", "adapter_merge.cli", "merge", *map(str, args), "--out", str(out), "--quiet"]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False, preexec_fn=preexec_fn)


def assert_refused(code: int, stderr: str, needles: tuple[str, ...], out_parent: Path,
                   left: list[str] | None = None) -> None:
    """Exit 1, exactly one `adapter-merge: error:` line naming one of `needles`, nothing left behind."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 1, f"exit {code}, stderr:\n{stderr}"
    assert len(lines) == 1, f"expected one error line, got:\n{stderr}"
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    assert any(n in lines[0] for n in needles), f"{lines[0]!r} names none of {needles}"
    assert sorted(os.listdir(out_parent)) == sorted(left or []), "output or temp folder left behind"


def raised(args: list[Path | str], out: Path) -> tuple[str, MergeError]:
    """Run the command line's engine call step by step: where the error is raised, and the error."""
    call = merge_call(build_parser().parse_args(["merge", *map(str, args), "--out", str(out)]))
    try:
        plan_merge(call.base, call.adapters, call.options)
    except MergeError as error:
        return "plan", error
    try:
        merge(*call)
    except MergeError as error:
        return "merge", error
    pytest.fail("the bad input was merged")


def facts_of(error: MergeError) -> dict[str, Any]:
    return {name: getattr(error, name) for name in FACTS}


def assert_facts(error: MergeError, expected: dict[str, Any]) -> None:
    assert facts_of(error) == {name: expected.get(name) for name in FACTS}, str(error)


# --- helpers that break files -------------------------------------------------------------------------


def _read_safetensors(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]), data[8 + length:]


def _write_safetensors(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + body)


def _edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _lora_key(module: str, suffix: str) -> str:
    return f"base_model.model.{module}.{suffix}"


def _first_tensor_past(header: dict, size: int) -> str:
    """The first tensor, in file order, whose data ends past `size` bytes of data."""
    entries = sorted((entry["data_offsets"], name) for name, entry in header.items() if name != "__metadata__")
    return next(name for (_, end), name in entries if end > size)


def to_legacy(adapter: Path) -> Path:
    """The adapter as adapter_model.bin only (torch.save of the same tensors)."""
    tensors = load_file(adapter / ADAPTER_FILE)
    (adapter / ADAPTER_FILE).unlink()
    torch.save(tensors, adapter / LEGACY_FILE)
    return adapter / LEGACY_FILE


def zip_bomb(path: Path) -> None:
    """A few KB whose data.pkl says it inflates to 2 GiB (the central directory's size field rewritten)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", bytes(2**20))
        archive.writestr("archive/version", "3\n")
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the central directory record of data.pkl, the first member
    data[entry + 24:entry + 28] = struct.pack("<I", 2**31)
    local = data.index(b"PK\x03\x04")
    data[local + 22:local + 26] = struct.pack("<I", 2**31)
    path.write_bytes(bytes(data))
    assert zipfile.ZipFile(path).getinfo("archive/data.pkl").file_size == 2**31


# --- the bad inputs -------------------------------------------------------------------------------------


def truncate_base(i: Inputs) -> Refusal:
    path = i.base / BASE_FILE
    header, _ = _read_safetensors(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _, kept = _read_safetensors(path)
    return Refusal([i.base, i.lora], (f"{i.base.name}/{BASE_FILE}",), InputError, "plan",
                   {"file": path, "input": "base", "tensor": _first_tensor_past(header, len(kept))})


def truncate_adapter(i: Inputs) -> Refusal:
    path = i.lora / ADAPTER_FILE
    path.write_bytes(path.read_bytes()[:-16])
    header, body = _read_safetensors(path)
    return Refusal([i.base, i.lora], (f"{i.lora.name}/{ADAPTER_FILE}",), InputError, "plan",
                   {"file": path, "input": 0, "tensor": _first_tensor_past(header, len(body))})


def header_length_past_eof(i: Inputs) -> Refusal:
    path = i.base / BASE_FILE
    data = path.read_bytes()
    path.write_bytes((len(data) + 1000).to_bytes(8, "little") + data[8:])
    return Refusal([i.base, i.lora], (f"{i.base.name}/{BASE_FILE}",), InputError, "plan",
                   {"file": path, "input": "base"})


def header_not_json(i: Inputs) -> Refusal:
    path = i.lora / ADAPTER_FILE
    data = bytearray(path.read_bytes())
    data[8:16] = b"{oops: ["
    path.write_bytes(bytes(data))
    return Refusal([i.base, i.lora], (f"{i.lora.name}/{ADAPTER_FILE}",), InputError, "plan",
                   {"file": path, "input": 0})


def data_offsets_past_eof(i: Inputs) -> Refusal:
    path = i.base / BASE_FILE
    header, body = _read_safetensors(path)
    name = f"{Q_PROJ}.weight"
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [len(body) + 64, len(body) + 64 + end - start]
    _write_safetensors(path, header, body)
    return Refusal([i.base, i.lora], (f"{i.base.name}/{BASE_FILE}", name), InputError, "plan",
                   {"file": path, "input": "base", "tensor": name})


def module_not_in_base(i: Inputs) -> Refusal:
    def rename(tensors: dict[str, torch.Tensor]) -> None:
        for suffix in ("lora_A.weight", "lora_B.weight"):
            tensors[_lora_key("model.layers.0.self_attn.nonexistent_proj", suffix)] = tensors.pop(
                _lora_key(Q_PROJ, suffix))

    _edit_tensors(i.lora / ADAPTER_FILE, rename)
    return Refusal([i.base, i.lora], ("nonexistent_proj",), InputError, "plan", {
        "file": i.lora / ADAPTER_FILE, "input": 0, "tensor": "model.layers.0.self_attn.nonexistent_proj.weight"})


def wrong_shape_lora_b(i: Inputs) -> Refusal:
    """The second adapter does not fit the base: the error is about adapter 1."""
    key = _lora_key(Q_PROJ, "lora_B.weight")

    def grow(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = torch.cat([tensors[key], tensors[key][:1]])

    _edit_tensors(i.lora / ADAPTER_FILE, grow)
    return Refusal([i.base, i.dora, i.lora], (Q_PROJ,), InputError, "plan",
                   {"file": i.lora / ADAPTER_FILE, "input": 1, "tensor": key})


def rank_differs_from_config(i: Inputs) -> Refusal:
    module = "model.layers.1.self_attn.q_proj"
    edit_adapter_config(i.lora, rank_pattern={r"layers\.1\.self_attn\.q_proj": 8})
    return Refusal([i.base, i.lora], ("r=8", module), InputError, "plan", {
        "file": i.lora / ADAPTER_FILE, "input": 0, "option": "r", "tensor": _lora_key(module, "lora_A.weight")})


def magnitude_without_use_dora(i: Inputs) -> Refusal:
    edit_adapter_config(i.dora, use_dora=False)
    return Refusal([i.base, i.lora, i.dora], ("use_dora",), InputError, "plan", {
        "file": i.dora / ADAPTER_FILE, "input": 1, "option": "use_dora",
        "tensor": _lora_key("model.layers.0.mlp.down_proj", "lora_magnitude_vector")})  # first in the file


def nan_in_adapter(i: Inputs) -> Refusal:
    key = _lora_key("model.layers.1.self_attn.v_proj", "lora_A.weight")

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key][0, 0] = math.nan

    _edit_tensors(i.lora / ADAPTER_FILE, poison)
    return Refusal([i.base, i.lora], ("model.layers.1.self_attn.v_proj",), NumericError, "merge",
                   {"file": i.lora / ADAPTER_FILE, "input": 0, "tensor": key})


def nan_in_base(i: Inputs) -> Refusal:
    """A base tensor an adapter changes is not finite: the base is at fault, not the adapter."""
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{Q_PROJ}.weight"][3, 5] = math.nan

    _edit_tensors(i.base / BASE_FILE, poison)
    return Refusal([i.base, i.lora], (Q_PROJ,), NumericError, "merge",
                   {"file": i.base / BASE_FILE, "input": "base", "tensor": f"{Q_PROJ}.weight"})


def fp16_overflow(i: Inputs) -> Refusal:
    """A delta of ~1e5 fits bf16 but not fp16 (max 65504): the output dtype is at fault."""
    _edit_tensors(i.lora / ADAPTER_FILE, _blow_up_down_proj)
    return Refusal([i.base, i.lora, "--dtype", "float16"], ("model.layers.0.mlp.down_proj",), NumericError, "merge",
                   {"option": "dtype", "tensor": "model.layers.0.mlp.down_proj.weight"})


def _blow_up_down_proj(tensors: dict[str, torch.Tensor]) -> None:
    tensors[_lora_key("model.layers.0.mlp.down_proj", "lora_B.weight")] *= 1e6


def dora_fp16_overflow(i: Inputs) -> Refusal:
    """A DoRA magnitude of ~1e5 scales its rows past fp16's range. The block's bound (its largest magnitude)
    is then past the overflow, so its values are checked, and the output dtype is at fault."""
    def blow_up_magnitude(tensors: dict[str, torch.Tensor]) -> None:
        tensors[_lora_key("model.layers.0.mlp.down_proj", "lora_magnitude_vector")] *= 1e6

    _edit_tensors(i.dora / ADAPTER_FILE, blow_up_magnitude)
    return Refusal([i.base, i.dora, "--dtype", "float16"], ("model.layers.0.mlp.down_proj",), NumericError, "merge",
                   {"option": "dtype", "tensor": "model.layers.0.mlp.down_proj.weight"})


def dora_zero_norm_row(i: Inputs) -> Refusal:
    """Row 0 of W + D is zero: PEFT would divide by a zero norm and write NaN."""
    def zero_base_row(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{Q_PROJ}.weight"][0] = 0

    def zero_b_row(tensors: dict[str, torch.Tensor]) -> None:
        tensors[_lora_key(Q_PROJ, "lora_B.weight")][0] = 0

    _edit_tensors(i.base / BASE_FILE, zero_base_row)
    _edit_tensors(i.dora / ADAPTER_FILE, zero_b_row)
    return Refusal([i.base, i.dora], (Q_PROJ,), NumericError, "merge",
                   {"file": i.dora / ADAPTER_FILE, "input": 0, "tensor": f"{Q_PROJ}.weight"})


def missing_base(i: Inputs) -> Refusal:
    path = i.base.parent / "no_such_base"
    return Refusal([path, i.lora], ("no_such_base",), InputError, "plan", {"file": path, "input": "base"})


def empty_base(i: Inputs) -> Refusal:
    empty = i.base.parent / "empty_base"
    empty.mkdir()
    return Refusal([empty, i.lora], ("empty_base",), InputError, "plan",
                   {"file": empty / "config.json", "input": "base"})


def missing_adapter_config(i: Inputs) -> Refusal:
    (i.lora / CONFIG_FILE).unlink()
    return Refusal([i.base, i.lora], (CONFIG_FILE,), InputError, "plan", {"file": i.lora / CONFIG_FILE, "input": 0})


def missing_adapter_weights(i: Inputs) -> Refusal:
    (i.lora / ADAPTER_FILE).unlink()
    return Refusal([i.base, i.lora], ("adapter_model",), InputError, "plan", {"file": i.lora, "input": 0})


def adapter_config_nested_deep(i: Inputs) -> Refusal:
    """Nesting that makes Python's json recurse past its limit (RecursionError, a 500 at the API)."""
    (i.lora / CONFIG_FILE).write_text("[" * 100_000 + "]" * 100_000)
    return Refusal([i.base, i.lora], ("nested deeper",), InputError, "plan", {"file": i.lora / CONFIG_FILE, "input": 0})


def alpha_beyond_float32(i: Inputs) -> Refusal:
    """Finite in Python, but alpha/r overflows the fp32 merge: refused while planning, not mid-merge."""
    edit_adapter_config(i.lora, lora_alpha=1e308)
    return Refusal([i.base, i.dora, i.lora], ("lora_alpha",), InputError, "plan",
                   {"file": i.lora / CONFIG_FILE, "input": 1, "option": "lora_alpha"})


def pattern_with_lookahead(i: Inputs) -> Refusal:
    """RE2 has no lookarounds: refused, naming the option and the key."""
    edit_adapter_config(i.lora, rank_pattern={"(?=q)q_proj": 4})
    return Refusal([i.base, i.lora], ("(?=q)q_proj",), InputError, "plan",
                   {"file": i.lora / CONFIG_FILE, "input": 0, "option": "rank_pattern"})


def legacy_adapter_zip_bomb(i: Inputs) -> Refusal:
    """A few KB of adapter_model.bin whose data.pkl claims 2 GiB."""
    path = to_legacy(i.lora)
    zip_bomb(path)
    return Refusal([i.base, i.lora], ("data.pkl",), InputError, "plan", {"file": path, "input": 0})


def unsupported(option: str, value: object, needles: tuple[str, ...] = ()) -> Callable[[Inputs], Refusal]:
    def corrupt(i: Inputs) -> Refusal:
        edit_adapter_config(i.lora, **{option: value})
        return Refusal([i.base, i.lora], needles or (option,), UnsupportedOptionError, "plan",
                       {"file": i.lora / CONFIG_FILE, "input": 0, "option": option})

    corrupt.__name__ = f"unsupported_{option}"
    return corrupt


BAD_INPUTS: list[Callable[[Inputs], Refusal]] = [
    missing_base, empty_base, missing_adapter_config, missing_adapter_weights,
    truncate_base, truncate_adapter, header_length_past_eof, header_not_json, data_offsets_past_eof,
    module_not_in_base, wrong_shape_lora_b, rank_differs_from_config, magnitude_without_use_dora,
    nan_in_adapter, nan_in_base, fp16_overflow, dora_fp16_overflow, dora_zero_norm_row,
    adapter_config_nested_deep, alpha_beyond_float32, pattern_with_lookahead, legacy_adapter_zip_bomb,
    unsupported("init_lora_weights", "pissa"),
    unsupported("layer_replication", [[0, 2], [1, 2]]),
    unsupported("use_qalora", True),
    unsupported("alora_invocation_tokens", [5, 6]),
    unsupported("target_parameters", ["mlp.experts.gate_up_proj"]),
    unsupported("peft_type", "IA3", ("peft_type", "IA3")),
]


@pytest.mark.parametrize("corrupt", BAD_INPUTS, ids=lambda f: f.__name__)
def test_bad_input_is_refused(inputs: Inputs, corrupt: Callable[[Inputs], Refusal],
                              capsys: pytest.CaptureFixture[str]) -> None:
    refusal = corrupt(inputs)
    assert_refused(*run_main(refusal.args, inputs.out, capsys), refusal.needles, inputs.out_parent)


@pytest.mark.parametrize("corrupt", BAD_INPUTS, ids=lambda f: f.__name__)
def test_bad_input_error_says_what_is_at_fault(inputs: Inputs, corrupt: Callable[[Inputs], Refusal]) -> None:
    """The engine raises the expected class at the expected stage (input faults in the preflight, before any
    output exists; numeric ones while merging), with attributes that say what is at fault."""
    refusal = corrupt(inputs)
    stage, error = raised(refusal.args, inputs.out)
    assert (stage, type(error)) == (refusal.stage, refusal.error), f"{stage}: {error!r}"
    assert error.fault == "input"
    assert_facts(error, refusal.facts)
    assert any(n in str(error) for n in refusal.needles), str(error)
    assert os.listdir(inputs.out_parent) == []


@pytest.mark.parametrize("corrupt", [truncate_base, fp16_overflow], ids=lambda f: f.__name__)
def test_bad_input_through_the_real_command_line(inputs: Inputs, corrupt: Callable[[Inputs], Refusal]) -> None:
    """The exit code and the one stderr line as a shell sees them, for a preflight and a mid-merge refusal."""
    refusal = corrupt(inputs)
    result = run_cli(*refusal.args, out=inputs.out)
    assert_refused(result.returncode, result.stderr, refusal.needles, inputs.out_parent)


def test_fp16_overflow_is_specific_to_fp16(inputs: Inputs, capsys: pytest.CaptureFixture[str]) -> None:
    """The same huge delta is fine in bf16, so the fp16 refusal above is about range, not the adapter."""
    _edit_tensors(inputs.lora / ADAPTER_FILE, _blow_up_down_proj)
    code, stderr = run_main([inputs.base, inputs.lora, "--dtype", "bfloat16"], inputs.out, capsys)
    assert code == 0, stderr
    merged = load_dir_tensors(inputs.out)["model.layers.0.mlp.down_proj.weight"]
    assert torch.isfinite(merged).all() and merged.abs().max() > 65504


def test_large_finite_fp16_values_are_not_an_overflow(inputs: Inputs, capsys: pytest.CaptureFixture[str]) -> None:
    """Every value of a block near fp16's largest: their sum, the merge's quick finiteness check, overflows, and
    the exact check behind it must find nothing wrong."""
    def near_fp16_max(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{Q_PROJ}.weight"].fill_(60000.0)

    _edit_tensors(inputs.base / BASE_FILE, near_fp16_max)
    code, stderr = run_main([inputs.base, inputs.lora, "--dtype", "float16"], inputs.out, capsys)
    assert code == 0, stderr
    merged = load_dir_tensors(inputs.out)[f"{Q_PROJ}.weight"]
    base = load_file(inputs.base / BASE_FILE)[f"{Q_PROJ}.weight"].float()
    assert merged.dtype == torch.float16 and torch.isfinite(merged).all()
    assert not math.isfinite(float(merged.sum()))
    assert float((merged.float() - base).abs().max()) <= 64  # the adapter's small change, in steps of 32


def test_existing_out_is_left_alone(inputs: Inputs, capsys: pytest.CaptureFixture[str]) -> None:
    inputs.out.mkdir()
    sentinel = inputs.out / "keep.txt"
    sentinel.write_text("precious")
    code, stderr = run_main([inputs.base, inputs.lora], inputs.out, capsys)
    assert_refused(code, stderr, (inputs.out.name,), inputs.out_parent, left=[inputs.out.name])
    stage, error = raised([inputs.base, inputs.lora], inputs.out)
    assert (stage, type(error), error.fault) == ("merge", OutputExistsError, "input")
    assert_facts(error, {"file": inputs.out, "option": "out"})
    assert sorted(p.name for p in inputs.out.iterdir()) == ["keep.txt"]
    assert sentinel.read_text() == "precious"


def test_overwrite_replaces_existing_out(inputs: Inputs, workspace: Workspace,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    inputs.out.mkdir()
    (inputs.out / "keep.txt").write_text("stale")
    code, stderr = run_main([inputs.base, inputs.lora, "--overwrite"], inputs.out, capsys)
    assert code == 0, stderr
    assert not (inputs.out / "keep.txt").exists()
    assert sorted(os.listdir(inputs.out_parent)) == [inputs.out.name]
    _assert_same_tensors(inputs.out, workspace.merged(CASES["llama_lora"]))


def test_control_good_inputs_merge(inputs: Inputs, workspace: Workspace) -> None:
    """The pristine copies merge through the real command line (with --weights and --dtype) to the API's
    exact bytes."""
    result = run_cli(inputs.base, inputs.lora, inputs.dora, "--weights", "1.0,0.5", "--dtype", "float32",
                     out=inputs.out)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(inputs.out_parent)) == [inputs.out.name]
    _assert_same_tensors(inputs.out, workspace.merged(CASES["llama_stacked"], "float32"))


def _assert_same_tensors(folder: Path, reference: Path) -> None:
    ours, theirs = load_dir_tensors(folder), load_dir_tensors(reference)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "CLI and API outputs differ"


# --- faults of the options and of the machine ------------------------------------------------------------


@pytest.mark.parametrize(("make", "option"), [
    (lambda: MergeOptions(dtype="float8"), "dtype"),  # type: ignore[arg-type]
    (lambda: MergeOptions(max_shard_size=0), "max_shard_size"),
    (lambda: parse_size("5XB"), "max_shard_size"),
], ids=["dtype", "max_shard_size", "parse_size"])
def test_bad_option_names_the_option(make: Callable[[], object], option: str) -> None:
    with pytest.raises(InputError) as caught:
        make()
    assert_facts(caught.value, {"option": option})
    assert str(caught.value).startswith(f"{option}: ")


def test_output_folder_that_cannot_be_created_is_a_storage_error(inputs: Inputs,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Creating the output folder fails (here its parent is a file): the machine's fault, not the input's."""
    blocker = inputs.out_parent / "not-a-folder"
    blocker.write_text("")
    out = blocker / "merged"
    code, stderr = run_main([inputs.base, inputs.lora], out, capsys)
    assert_refused(code, stderr, ("cannot create the output folder",), inputs.out_parent, left=[blocker.name])
    stage, error = raised([inputs.base, inputs.lora], out)
    assert (stage, type(error), error.fault) == ("merge", StorageError, "machine")
    assert_facts(error, {"file": out})


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_shard_write_failure_is_a_storage_error(inputs: Inputs, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """A shard write that fails is a StorageError naming the shard, which says whether the disk (or quota) was
    full; the partial output goes."""
    def fail(fd: int, data: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(engine_writer, "write_all", fail)
    stage, error = raised([inputs.base, inputs.lora], inputs.out)
    assert (stage, type(error), error.fault) == ("merge", StorageError, "machine")
    assert error.file is not None and error.file.name == BASE_FILE
    assert_facts(error, {"file": error.file})
    assert isinstance(error, StorageError) and error.disk_full == (code != errno.EIO)
    assert os.strerror(code) in str(error) and BASE_FILE in str(error)
    assert os.listdir(inputs.out_parent) == []


def test_disk_full_while_writing_side_files(inputs: Inputs, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up after the shards, while config.json is written: still disk_full, nothing left."""
    def full(path: Path, value: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(engine_side_files, "write_json", full)
    stage, error = raised([inputs.base, inputs.lora], inputs.out)
    assert (stage, type(error)) == ("merge", StorageError)
    assert isinstance(error, StorageError) and error.disk_full
    assert error.file is not None and error.file.name == "config.json"
    assert os.listdir(inputs.out_parent) == []


def test_storage_error_keeps_disk_full_across_processes() -> None:
    error = StorageError("full", file=Path("/out/x"), disk_full=True)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.disk_full, facts_of(copy)) == (True, facts_of(error))
    assert not StorageError("denied").disk_full


def test_errors_keep_their_facts_across_processes() -> None:
    """Merges run in worker processes: an error pickled back to the service keeps its message and facts."""
    error = InputError("adapter 1: bad", file=Path("/a/b"), tensor="t", option="r", input=1)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), facts_of(copy)) == (InputError, str(error), facts_of(error))


def test_fault_of_each_error_class() -> None:
    assert [cls.fault for cls in (InputError, UnsupportedOptionError, NumericError, StorageError)] == [
        "input", "input", "input", "machine"]
    assert not hasattr(MergeCancelled("stop"), "fault")


def _limit_file_size(limit: int) -> Callable[[], None]:
    """For a child process: writes past `limit` bytes fail with EFBIG, as on a full disk (not a signal)."""
    import resource
    import signal

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_write_failure_mid_merge_is_an_error_not_a_hang(inputs: Inputs) -> None:
    """A shard write that fails part-way (here: a real file size limit, so in a child process) ends the merge
    at once with one error line naming the file, and removes the partial output: the writer thread must not
    strand the merge."""
    limit = (inputs.base / BASE_FILE).stat().st_size // 2
    result = run_cli(inputs.base, inputs.lora, inputs.dora, out=inputs.out, timeout=120,
                     preexec_fn=_limit_file_size(limit))
    assert_refused(result.returncode, result.stderr, ("File too large",), inputs.out_parent)
    assert BASE_FILE in result.stderr
