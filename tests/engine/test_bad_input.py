"""Bad inputs through the real command line: exit 1, one error line naming the culprit, no output left.

Each test copies pristine, known-good inputs (the control test proves they merge), breaks one thing in the
files and runs `adapter-merge merge` as a subprocess, exactly as a user would.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.builders import CASES, edit_adapter_config
from tests.engine.conftest import Workspace
from tests.oracle import load_dir_tensors

REPO = Path(__file__).resolve().parents[2]
ERROR_PREFIX = "adapter-merge: error: "
BASE_FILE, ADAPTER_FILE = "model.safetensors", "adapter_model.safetensors"
Q_PROJ = "model.layers.0.self_attn.q_proj"


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
def inputs(workspace: Workspace, tmp_path: Path) -> Inputs:
    case = CASES["llama_stacked"]  # a bf16 Llama with a LoRA and a DoRA adapter
    base_dir, ((lora, _), (dora, _)) = workspace.inputs(case)
    copies = [shutil.copytree(src, tmp_path / "in" / name) for src, name in
              [(base_dir, "base"), (lora, "lora"), (dora, "dora")]]
    (tmp_path / "outs").mkdir()
    return Inputs(*copies, out=tmp_path / "outs" / "merged")


def run_cli(*args: str | Path, out: Path) -> subprocess.CompletedProcess[str]:
    """`adapter-merge merge ARGS --out OUT --quiet` in a fresh interpreter."""
    env = {**os.environ, "ADAPTER_MERGE_CACHE": str(out.parent.parent / "checksum-cache")}
    command = [sys.executable, "-m", "adapter_merge.cli", "merge", *map(str, args), "--out", str(out), "--quiet"]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


def assert_refused(result: subprocess.CompletedProcess[str], needles: tuple[str, ...], out_parent: Path,
                   left: list[str] | None = None) -> None:
    """Exit 1, exactly one `adapter-merge: error:` line naming one of `needles`, nothing left behind."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, f"exit {result.returncode}, stderr:\n{result.stderr}"
    assert len(lines) == 1, f"expected one error line, got:\n{result.stderr}"
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    assert any(n in lines[0] for n in needles), f"{lines[0]!r} names none of {needles}"
    assert sorted(os.listdir(out_parent)) == sorted(left or []), "output or temp folder left behind"


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


# --- the bad inputs -------------------------------------------------------------------------------------


def truncate_base(i: Inputs) -> tuple[list[Path | str], tuple[str, ...]]:
    path = i.base / BASE_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return [i.base, i.lora], (f"{i.base.name}/{BASE_FILE}",)


def truncate_adapter(i: Inputs) -> tuple[list[Path | str], tuple[str, ...]]:
    path = i.lora / ADAPTER_FILE
    path.write_bytes(path.read_bytes()[:-16])
    return [i.base, i.lora], (f"{i.lora.name}/{ADAPTER_FILE}",)


def header_length_past_eof(i: Inputs) -> tuple[list[Path | str], tuple[str, ...]]:
    path = i.base / BASE_FILE
    data = path.read_bytes()
    path.write_bytes((len(data) + 1000).to_bytes(8, "little") + data[8:])
    return [i.base, i.lora], (f"{i.base.name}/{BASE_FILE}",)


def header_not_json(i: Inputs) -> tuple[list[Path | str], tuple[str, ...]]:
    path = i.lora / ADAPTER_FILE
    data = bytearray(path.read_bytes())
    data[8:16] = b"{oops: ["
    path.write_bytes(bytes(data))
    return [i.base, i.lora], (f"{i.lora.name}/{ADAPTER_FILE}",)


def data_offsets_past_eof(i: Inputs) -> tuple[list[Path | str], tuple[str, ...]]:
    path = i.base / BASE_FILE
    header, body = _read_safetensors(path)
    name = f"{Q_PROJ}.weight"
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [len(body) + 64, len(body) + 64 + end - start]
    _write_safetensors(path, header, body)
    return [i.base, i.lora], (f"{i.base.name}/{BASE_FILE}", name)


def module_not_in_base(i: Inputs) -> tuple[list[Path | str], tuple[str, ...]]:
    def rename(tensors: dict[str, torch.Tensor]) -> None:
        for suffix in ("lora_A.weight", "lora_B.weight"):
            tensors[_lora_key("model.layers.0.self_attn.nonexistent_proj", suffix)] = tensors.pop(
                _lora_key(Q_PROJ, suffix))

    _edit_tensors(i.lora / ADAPTER_FILE, rename)
    return [i.base, i.lora], ("nonexistent_proj",)


def wrong_shape_lora_b(i: Inputs) -> tuple[list[Path | str], tuple[str, ...]]:
    def grow(tensors: dict[str, torch.Tensor]) -> None:
        key = _lora_key(Q_PROJ, "lora_B.weight")
        tensors[key] = torch.cat([tensors[key], tensors[key][:1]])

    _edit_tensors(i.lora / ADAPTER_FILE, grow)
    return [i.base, i.lora], (Q_PROJ,)


def nan_in_adapter(i: Inputs) -> tuple[list[Path | str], tuple[str, ...]]:
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[_lora_key("model.layers.1.self_attn.v_proj", "lora_A.weight")][0, 0] = math.nan

    _edit_tensors(i.lora / ADAPTER_FILE, poison)
    return [i.base, i.lora], ("model.layers.1.self_attn.v_proj",)


def fp16_overflow(i: Inputs) -> tuple[list[Path | str], tuple[str, ...]]:
    """A delta of ~1e5 fits bf16 but not fp16 (max 65504)."""
    _edit_tensors(i.lora / ADAPTER_FILE, _blow_up_down_proj)
    return [i.base, i.lora, "--dtype", "float16"], ("model.layers.0.mlp.down_proj",)


def _blow_up_down_proj(tensors: dict[str, torch.Tensor]) -> None:
    tensors[_lora_key("model.layers.0.mlp.down_proj", "lora_B.weight")] *= 1e6


def dora_zero_norm_row(i: Inputs) -> tuple[list[Path | str], tuple[str, ...]]:
    """Row 0 of W + D is zero: PEFT would divide by a zero norm and write NaN."""
    def zero_base_row(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{Q_PROJ}.weight"][0] = 0

    def zero_b_row(tensors: dict[str, torch.Tensor]) -> None:
        tensors[_lora_key(Q_PROJ, "lora_B.weight")][0] = 0

    _edit_tensors(i.base / BASE_FILE, zero_base_row)
    _edit_tensors(i.dora / ADAPTER_FILE, zero_b_row)
    return [i.base, i.dora], (Q_PROJ,)


def missing_base(i: Inputs) -> tuple[list[Path | str], tuple[str, ...]]:
    return [i.base.parent / "no_such_base", i.lora], ("no_such_base",)


def empty_base(i: Inputs) -> tuple[list[Path | str], tuple[str, ...]]:
    empty = i.base.parent / "empty_base"
    empty.mkdir()
    return [empty, i.lora], ("empty_base",)


def missing_adapter_config(i: Inputs) -> tuple[list[Path | str], tuple[str, ...]]:
    (i.lora / "adapter_config.json").unlink()
    return [i.base, i.lora], ("adapter_config.json",)


def missing_adapter_weights(i: Inputs) -> tuple[list[Path | str], tuple[str, ...]]:
    (i.lora / ADAPTER_FILE).unlink()
    return [i.base, i.lora], ("adapter_model",)


def weights_count(i: Inputs) -> tuple[list[Path | str], tuple[str, ...]]:
    return [i.base, i.lora, "--weights", "1.0,0.5"], ("--weights",)


def weights_not_numbers(i: Inputs) -> tuple[list[Path | str], tuple[str, ...]]:
    return [i.base, i.lora, i.dora, "--weights", "1.0,half"], ("--weights",)


def unsupported(option: str, value: object, needles: tuple[str, ...] = ()) -> Callable:
    def corrupt(i: Inputs) -> tuple[list[Path | str], tuple[str, ...]]:
        edit_adapter_config(i.lora, **{option: value})
        return [i.base, i.lora], needles or (option,)

    corrupt.__name__ = f"unsupported_{option}"
    return corrupt


BAD_INPUTS: list[Callable[[Inputs], tuple[list[Path | str], tuple[str, ...]]]] = [
    missing_base, empty_base, missing_adapter_config, missing_adapter_weights,
    truncate_base, truncate_adapter, header_length_past_eof, header_not_json, data_offsets_past_eof,
    module_not_in_base, wrong_shape_lora_b, nan_in_adapter, fp16_overflow, dora_zero_norm_row,
    weights_count, weights_not_numbers,
    unsupported("init_lora_weights", "pissa"),
    unsupported("layer_replication", [[0, 2], [1, 2]]),
    unsupported("use_qalora", True),
    unsupported("alora_invocation_tokens", [5, 6]),
    unsupported("target_parameters", ["mlp.experts.gate_up_proj"]),
    unsupported("peft_type", "IA3", ("peft_type", "IA3")),
]


@pytest.mark.parametrize("corrupt", BAD_INPUTS, ids=lambda f: f.__name__)
def test_bad_input_is_refused(inputs: Inputs, corrupt: Callable) -> None:
    args, needles = corrupt(inputs)
    assert_refused(run_cli(*args, out=inputs.out), needles, inputs.out_parent)


def test_fp16_overflow_is_specific_to_fp16(inputs: Inputs) -> None:
    """The same huge delta is fine in bf16, so the fp16 refusal above is about range, not the adapter."""
    _edit_tensors(inputs.lora / ADAPTER_FILE, _blow_up_down_proj)
    result = run_cli(inputs.base, inputs.lora, "--dtype", "bfloat16", out=inputs.out)
    assert result.returncode == 0, result.stderr
    merged = load_dir_tensors(inputs.out)["model.layers.0.mlp.down_proj.weight"]
    assert torch.isfinite(merged).all() and merged.abs().max() > 65504


def test_existing_out_is_left_alone(inputs: Inputs) -> None:
    inputs.out.mkdir()
    sentinel = inputs.out / "keep.txt"
    sentinel.write_text("precious")
    result = run_cli(inputs.base, inputs.lora, out=inputs.out)
    assert_refused(result, (inputs.out.name,), inputs.out_parent, left=[inputs.out.name])
    assert sorted(p.name for p in inputs.out.iterdir()) == ["keep.txt"]
    assert sentinel.read_text() == "precious"


def test_overwrite_replaces_existing_out(inputs: Inputs, workspace: Workspace) -> None:
    inputs.out.mkdir()
    (inputs.out / "keep.txt").write_text("stale")
    result = run_cli(inputs.base, inputs.lora, "--overwrite", out=inputs.out)
    assert result.returncode == 0, result.stderr
    assert not (inputs.out / "keep.txt").exists()
    assert sorted(os.listdir(inputs.out_parent)) == [inputs.out.name]
    _assert_same_tensors(inputs.out, workspace.merged(CASES["llama_lora"]))


def test_control_good_inputs_merge(inputs: Inputs, workspace: Workspace) -> None:
    """The pristine copies merge through the CLI (with --weights and --dtype) to the API's exact bytes."""
    result = run_cli(inputs.base, inputs.lora, inputs.dora, "--weights", "1.0,0.5", "--dtype", "float32",
                     out=inputs.out)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(inputs.out_parent)) == [inputs.out.name]
    _assert_same_tensors(inputs.out, workspace.merged(CASES["llama_stacked"], "float32"))


def _assert_same_tensors(folder: Path, reference: Path) -> None:
    ours, theirs = load_dir_tensors(folder), load_dir_tensors(reference)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "CLI and API outputs differ"


# --- the same refusals through the Python API ---------------------------------------------------------

PLAN_ERRORS = [
    (unsupported("init_lora_weights", "pissa"), "UnsupportedOptionError"),
    (unsupported("use_qalora", True), "UnsupportedOptionError"),
    (unsupported("peft_type", "IA3", ("peft_type",)), "UnsupportedOptionError"),
    (module_not_in_base, "InputError"),
    (wrong_shape_lora_b, "InputError"),
    (header_not_json, "InputError"),
    (missing_adapter_config, "InputError"),
]


@pytest.mark.parametrize(("corrupt", "error"), PLAN_ERRORS, ids=lambda x: getattr(x, "__name__", x))
def test_plan_merge_refuses_before_writing(inputs: Inputs, corrupt: Callable, error: str) -> None:
    """Preflight (`plan_merge`) finds input faults from headers and configs alone, as the API's 4xx needs."""
    import adapter_merge.worker.engine as engine

    args, needles = corrupt(inputs)
    adapters = [engine.AdapterSpec(Path(a)) for a in args[1:]]
    with pytest.raises(getattr(engine, error)) as caught:
        engine.plan_merge(Path(args[0]), adapters, engine.MergeOptions())
    assert any(n in str(caught.value) for n in needles), str(caught.value)
    assert os.listdir(inputs.out_parent) == []


@pytest.mark.parametrize("corrupt", [nan_in_adapter, fp16_overflow, dora_zero_norm_row], ids=lambda f: f.__name__)
def test_numeric_faults_raise_numeric_error(inputs: Inputs, corrupt: Callable) -> None:
    """Faults found in the data while merging are NumericError (not the requester's malformed input)."""
    import adapter_merge.worker.engine as engine

    args, needles = corrupt(inputs)
    paths = [a for a in args if isinstance(a, Path)]
    dtype = args[args.index("--dtype") + 1] if "--dtype" in args else "auto"
    with pytest.raises(engine.NumericError) as caught:
        engine.merge(paths[0], [engine.AdapterSpec(p) for p in paths[1:]], inputs.out,
                     engine.MergeOptions(dtype=dtype))
    assert any(n in str(caught.value) for n in needles), str(caught.value)
    assert os.listdir(inputs.out_parent) == []


def _limit_file_size(limit: int) -> Callable[[], None]:
    """For a child process: writes past `limit` bytes fail with EFBIG, as on a full disk (not a signal)."""
    import resource
    import signal

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_write_failure_mid_merge_is_an_error_not_a_hang(inputs: Inputs) -> None:
    """A shard write that fails part-way (here: a file size limit) ends the merge at once with one error
    line naming the file, and removes the partial output: the writer thread must not strand the merge."""
    limit = (inputs.base / BASE_FILE).stat().st_size // 2
    env = {**os.environ, "ADAPTER_MERGE_CACHE": str(inputs.out_parent.parent / "checksum-cache")}
    command = [sys.executable, "-m", "adapter_merge.cli", "merge", str(inputs.base), str(inputs.lora), str(inputs.dora),
               "--out", str(inputs.out), "--quiet"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                            check=False, preexec_fn=_limit_file_size(limit))
    assert_refused(result, ("File too large",), inputs.out_parent)
    assert BASE_FILE in result.stderr
