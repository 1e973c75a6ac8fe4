"""Every output tensor against PEFT's float64 merge rounded once, plus the files around the tensors.

The bar (merge-semantics.md): 16-bit outputs within 1 ulp of the correctly rounded answer in every element;
fp32 outputs within 1e-5 of the adapter's change; tensors no adapter touches copied bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.builders import CASES, DTYPES, SIDE_FILES
from tests.engine.conftest import Workspace, read_json, run_merge
from tests.oracle import change_rel_error, load_dir_tensors, round_once, torch_dtype, ulp_distance

FP32_CHANGE_TOL = 1e-5
MAX_ULP = 1
DTYPE_KEYS = ("dtype", "torch_dtype")
TIED_SOURCE = "model.embed_tokens.weight"  # what lm_head is before the merge in the untied Llama case

MANIFEST_KEYS = ["engine", "created_at", "base", "adapters", "options", "tensors", "outputs", "copied", "skipped",
                 "timings", "notes"]
"""The manifest's layout, in order."""

CASE_DTYPES = [pytest.param(name, dtype, id=f"{name}-{dtype}")
               for name, case in CASES.items() for dtype in case.dtypes]


def _before(base: dict[str, torch.Tensor], name: str, exact: torch.Tensor) -> torch.Tensor:
    """The tensor as it was before the merge, in the shape of the result (zeros where rows are new)."""
    before = base.get(name, base.get(TIED_SOURCE))
    if before is None or before.shape != exact.shape:
        return torch.zeros_like(exact)
    return before.double()


def _is_untouched(base: dict[str, torch.Tensor], name: str, exact: torch.Tensor) -> bool:
    return name in base and base[name].shape == exact.shape and torch.equal(base[name].double(), exact)


def _mismatch(name: str, got: torch.Tensor, exact: torch.Tensor, before: torch.Tensor,
              untouched: bool) -> str | None:
    """A description of how `got` misses the oracle, or None when it is within the bar."""
    if got.shape != exact.shape:
        return f"{name}: shape {tuple(got.shape)}, expected {tuple(exact.shape)}"
    want = round_once(exact, got.dtype)
    if untouched:  # a single conversion of the base value: must be exactly the correctly rounded one
        if not torch.equal(got, want):
            return f"{name}: untouched tensor differs from the base converted once ({_worst(got, want)})"
        return None
    if got.dtype == torch.float32:
        error = change_rel_error(got, exact, before)
        return None if error <= FP32_CHANGE_TOL else f"{name}: change rel. error {error:.2e} > {FP32_CHANGE_TOL}"
    ulps = ulp_distance(got, want)
    if int(ulps.max()) > MAX_ULP:
        return f"{name}: {_worst(got, want)}, {int((ulps > MAX_ULP).sum())}/{ulps.numel()} elements > 1 ulp"
    return None


def _worst(got: torch.Tensor, want: torch.Tensor) -> str:
    """The worst element, for a failure message that tells the engine author where to look."""
    if got.dtype == torch.float32:
        diff = (got.double() - want.double()).abs()
        i = int(diff.argmax())
        return f"worst at flat index {i}: got {got.flatten()[i].item()!r}, want {want.flatten()[i].item()!r}"
    ulps = ulp_distance(got, want)
    i = int(ulps.argmax())
    return (f"max {int(ulps.max())} ulp at flat index {i}: got {got.flatten()[i].item()!r}, "
            f"want {want.flatten()[i].item()!r}")


@pytest.mark.parametrize(("case_name", "dtype"), CASE_DTYPES)
def test_tensors_match_oracle(workspace: Workspace, case_name: str, dtype: str) -> None:
    """Same tensor names as the oracle's checkpoint, output dtype everywhere, every element within the bar."""
    case = CASES[case_name]
    ours = load_dir_tensors(workspace.merged(case, dtype))
    exact = workspace.oracle(case)
    base = workspace.base_tensors(case)
    assert sorted(ours) == sorted(exact)
    out_dtype = torch_dtype(dtype, DTYPES[case.base.dtype])
    wrong_dtype = {name: t.dtype for name, t in ours.items() if t.dtype != out_dtype}
    assert not wrong_dtype, f"expected {out_dtype} everywhere: {wrong_dtype}"
    problems = [p for name in sorted(exact) if (p := _mismatch(
        name, ours[name], exact[name], _before(base, name, exact[name]), _is_untouched(base, name, exact[name])))]
    assert not problems, "\n".join(problems)


KEEP_DTYPE = [pytest.param(name, dtype, id=f"{name}-{dtype}") for name, case in CASES.items()
              for dtype in ("auto", case.base.dtype) if dtype in case.dtypes]


def _raw(tensor: torch.Tensor) -> tuple[torch.dtype, bytes]:
    return tensor.dtype, tensor.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize(("case_name", "dtype"), KEEP_DTYPE)
def test_untouched_tensors_are_byte_identical(workspace: Workspace, case_name: str, dtype: str) -> None:
    """Without a dtype change, every tensor the adapters leave alone keeps its exact bytes."""
    case = CASES[case_name]
    ours = load_dir_tensors(workspace.merged(case, dtype))
    exact = workspace.oracle(case)
    base = workspace.base_tensors(case)
    untouched = [name for name in base if _is_untouched(base, name, exact[name])]
    assert untouched, "every case leaves some tensor alone"
    differ = [name for name in untouched if _raw(ours[name]) != _raw(base[name])]
    assert not differ, f"changed bytes: {differ}"


@pytest.mark.parametrize(("case_name", "dtype"), CASE_DTYPES)
def test_config(workspace: Workspace, case_name: str, dtype: str) -> None:
    """config.json is the base's with only the dtype, tie flag and vocab size changed, and only when needed.

    Writing both `dtype` and `torch_dtype` (for transformers 4 and 5 readers) is allowed; both must agree.
    """
    case = CASES[case_name]
    expected = read_json(workspace.base(case.base) / "config.json")
    ours = read_json(workspace.merged(case, dtype) / "config.json")
    out_dtype = case.base.dtype if dtype == "auto" else dtype
    written = {k: ours.pop(k) for k in DTYPE_KEYS if k in ours}
    assert {k for k in DTYPE_KEYS if k in expected} <= set(written), f"config lost its dtype key: {written}"
    assert set(written.values()) == {out_dtype}, written
    for key in DTYPE_KEYS:
        expected.pop(key, None)
    if case.untie:
        expected["tie_word_embeddings"] = False
    if case.resized_vocab:
        expected["vocab_size"] = case.resized_vocab
    assert ours == expected


def test_legacy_torch_dtype_key_is_updated(workspace: Workspace, tmp_path: Path) -> None:
    """Checkpoints from transformers 4 say `torch_dtype`; a dtype change must update that key too."""
    case = CASES["llama_lora"]
    base_dir, adapters = workspace.inputs(case)
    legacy = tmp_path / "base"
    shutil.copytree(base_dir, legacy)
    config = read_json(legacy / "config.json")
    config["torch_dtype"] = config.pop("dtype")
    (legacy / "config.json").write_text(json.dumps(config, indent=2))
    run_merge(legacy, adapters, tmp_path / "out", dtype="float32")
    written = read_json(tmp_path / "out" / "config.json")
    assert written.get("torch_dtype") == "float32"
    assert written.get("dtype", "float32") == "float32"


@pytest.mark.parametrize("case_name", ["llama_lora", "bert_lora_bias"])
def test_side_files_and_manifest(workspace: Workspace, case_name: str) -> None:
    """Tokenizer/generation files are copied unchanged; the manifest hashes match the files written."""
    case = CASES[case_name]
    base_dir = workspace.base(case.base)
    out = workspace.merged(case)
    side = [*SIDE_FILES, "generation_config.json"]
    for name in side:
        if (base_dir / name).exists():
            assert (out / name).read_bytes() == (base_dir / name).read_bytes(), name
    manifest = read_json(out / "merge_manifest.json")
    assert list(manifest) == MANIFEST_KEYS  # no "host": the manifest travels, the worker's name stays home
    assert manifest["base"]["path"] == str(base_dir)  # no allowed_roots: paths as given
    assert {entry["path"] for entry in manifest["base"]["files"]} == {p.name for p in base_dir.iterdir()}
    adapters = workspace.inputs(case)[1]
    assert len(manifest["adapters"]) == len(adapters)
    for entry, (path, weight) in zip(manifest["adapters"], adapters, strict=True):
        assert list(entry) == ["path", "weight", "config", "files"]
        assert (entry["path"], entry["weight"]) == (str(path), weight)
        digest = hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()
        assert _files(entry["files"])["adapter_model.safetensors"] == digest, f"wrong sha256 of {path.name}"
    listed = _files(manifest["outputs"])
    assert set(listed) == {p.name for p in out.iterdir()} - {"merge_manifest.json"}
    for name, digest in listed.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    copied = {entry["path"]: entry for entry in manifest["copied"]}
    assert set(copied) == {p.name for p in base_dir.iterdir()} - {"config.json", "model.safetensors"}
    assert all(entry["from"] == "base" and entry["sha256"] == listed[name] for name, entry in copied.items())
    assert manifest["skipped"] == []


@pytest.mark.parametrize("case_name", ["llama_lora", "llama_dora", "llama_stacked", "gpt2_dora", "vit_conv_dora",
                                       "llama_embedding_dora", "llama_tied_lm_head"])
def test_manifest_relative_change_matches_the_oracle(workspace: Workspace, case_name: str) -> None:
    """The manifest's per-tensor change, ||W - W0|| / ||W0|| before rounding, for every tensor the merge changed:
    computed in closed form from a plain LoRA's factors, measured block by block otherwise (DoRA, stacks)."""
    case = CASES[case_name]
    exact, base = workspace.oracle(case), workspace.base_tensors(case)
    recorded = read_json(workspace.merged(case) / "merge_manifest.json")["tensors"]["relative_change"]
    changed = {name for name in exact if not _is_untouched(base, name, exact[name])}
    assert set(recorded) == changed
    for name, value in recorded.items():
        before = _before(base, name, exact[name])
        want = float((exact[name] - before).norm() / before.norm())
        assert value == pytest.approx(want, rel=1e-3), name


def _files(entries: list[dict]) -> dict[str, str]:
    """{relative path: sha256} from a manifest file list, whose entries are a path, a size and a sha256."""
    assert entries, "empty file list"
    assert all(set(entry) == {"path", "size", "sha256"} for entry in entries), entries
    return {entry["path"]: entry["sha256"] for entry in entries}


def _shard_layout(folder: Path) -> tuple[dict[str, str], dict]:
    """(tensor -> file, index metadata), checked against what each shard really holds."""
    index = read_json(folder / "model.safetensors.index.json")
    weight_map: dict[str, str] = index["weight_map"]
    held: dict[str, str] = {}
    tensor_bytes = 0
    for shard in sorted(set(weight_map.values())):
        with safe_open(folder / shard, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}, shard
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                held[key] = shard
                tensor = handle.get_tensor(key)
                tensor_bytes += tensor.numel() * tensor.element_size()
    assert held == weight_map, "index weight_map disagrees with the shards' contents"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == sorted(set(weight_map.values()))
    assert index["metadata"]["total_size"] == tensor_bytes
    return weight_map, index["metadata"]


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_sharded_base_keeps_layout(workspace: Workspace, dtype: str) -> None:
    """A sharded base gives the same shard files and the same tensor-to-shard map, with a correct index."""
    case = CASES["llama_sharded"]
    base_map, _ = _shard_layout(workspace.base(case.base))
    assert len(set(base_map.values())) > 1, "the builder must produce several shards"
    ours_map, _ = _shard_layout(workspace.merged(case, dtype))
    assert ours_map == base_map


def test_single_file_output_has_pt_metadata(workspace: Workspace) -> None:
    with safe_open(workspace.merged(CASES["llama_lora"]) / "model.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_max_shard_size_reshards(workspace: Workspace) -> None:
    """--max-shard-size splits a single-file base into shards no bigger than asked, tensors unchanged."""
    case = CASES["llama_lora"]
    limit = 20_000
    folder = workspace.merged(case, "auto", max_shard_size=limit)
    weight_map, _ = _shard_layout(folder)
    assert len(set(weight_map.values())) > 1
    tensors = load_dir_tensors(folder)
    for shard in set(weight_map.values()):
        size = sum(tensors[k].numel() * tensors[k].element_size() for k, f in weight_map.items() if f == shard)
        largest = max(tensors[k].numel() * tensors[k].element_size() for k, f in weight_map.items() if f == shard)
        assert size <= limit or size == largest, f"{shard} holds {size} bytes > {limit}"
    single = load_dir_tensors(workspace.merged(case, "auto"))
    assert sorted(single) == sorted(tensors)
    assert all(torch.equal(single[k], tensors[k]) for k in single)


def test_bin_adapter_matches_safetensors(workspace: Workspace, tmp_path: Path) -> None:
    """A legacy adapter_model.bin (torch.save) merges to exactly the same bytes as its safetensors twin."""
    case = CASES["llama_dora"]
    bin_dir = workspace.adapter(case.base, case.adapters[0], safe=False)
    assert not (bin_dir / "adapter_model.safetensors").exists()
    saved = torch.load(bin_dir / "adapter_model.bin", weights_only=True)
    twin = load_file(workspace.adapter(case.base, case.adapters[0]) / "adapter_model.safetensors")
    assert sorted(saved) == sorted(twin) and all(torch.equal(saved[k], twin[k]) for k in twin)
    run_merge(workspace.base(case.base), [(bin_dir, 1.0)], tmp_path / "out")
    from_bin = load_dir_tensors(tmp_path / "out")
    from_safetensors = load_dir_tensors(workspace.merged(case))
    assert sorted(from_bin) == sorted(from_safetensors)
    assert all(torch.equal(from_bin[k], from_safetensors[k]) for k in from_bin)


def test_planning_a_bin_adapter_does_not_import_torch(workspace: Workspace) -> None:
    """The API preflights with plan_merge and has no torch: a legacy adapter's shapes are read torch-free."""
    case = CASES["llama_dora"]
    bin_dir = workspace.adapter(case.base, case.adapters[0], safe=False)
    script = (
        "import sys\n"
        "from adapter_merge.worker.engine import AdapterSpec, plan_merge\n"
        f"plan = plan_merge({str(workspace.base(case.base))!r}, [AdapterSpec({str(bin_dir)!r})])\n"
        "assert 'torch' not in sys.modules, 'planning imported torch'\n"
        "print(sum(1 for t in plan.outputs if t.ops))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 0  # the adapter's LoRA/DoRA ops were planned from the pickle's shapes
