"""The merged folder holds everything of the base that is not weights, at the same relative paths; weights in
other formats, exports, hidden folders, special files and links to folders are left out, and the manifest
says what was copied and what was skipped and why."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from adapter_merge.worker.engine import (
    AdapterSpec,
    InputError,
    MergeOptions,
    StorageError,
    folder_survey,
    merge,
    plan_merge,
)
from adapter_merge.worker.engine import side_files as engine_side_files
from adapter_merge.worker.engine.folder_survey import WEIGHTS_REASON
from tests.engine.conftest import Inputs, read_json

NESTED = {
    "1_Pooling/config.json": '{"pooling_mode_mean_tokens": true}\n',
    "2_Dense/config.json": '{"in_features": 32, "out_features": 8}\n',
    "2_Dense/model.safetensors": "dense weights, which no adapter touches\n",
    "tokenizer/extra/merges.txt": "a b\n",
    "generation_config.json": '{"do_sample": false}\n',
    "modules.json": json.dumps([{"idx": 0, "name": "0", "path": "", "type": "Transformer"},
                                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "Pooling"},
                                {"idx": 2, "name": "2", "path": "2_Dense", "type": "Dense"}]),
    ".gitattributes": "*.safetensors filter=lfs\n",
}
NOT_COPIED = {
    "pytorch_model.bin": WEIGHTS_REASON,
    "tf_model.h5": WEIGHTS_REASON,
    "checkpoints/optimizer.pt": WEIGHTS_REASON,
    "onnx": "an export of the unmerged model to another runtime",
    ".git": "a hidden folder (version control or a tool's cache), not part of the model",
    "merge_manifest.json": "the base's own merge manifest; this merge writes its own",
}


def _dress(base: Path) -> None:
    """Give the base what real checkpoints carry beside their weights."""
    for name, text in NESTED.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text(text)
    for name in ("pytorch_model.bin", "tf_model.h5", "checkpoints/optimizer.pt", "onnx/model.onnx",
                 "onnx/config.json", ".git/HEAD", "merge_manifest.json"):
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text("stale\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_everything_but_weights_is_copied_at_its_relative_path(inputs: Inputs) -> None:
    _dress(inputs.base)
    merge(inputs.base, [AdapterSpec(inputs.lora)], inputs.out, MergeOptions(fsync=True))
    for name in [*NESTED, "tokenizer.json"]:
        assert (inputs.out / name).read_bytes() == (inputs.base / name).read_bytes(), name
    for name in [*NOT_COPIED, "checkpoints"]:
        assert name == "merge_manifest.json" or not (inputs.out / name).exists(), name
    manifest = read_json(inputs.out / "merge_manifest.json")
    assert manifest["engine"]["name"] == "adapter-merge"  # its own, not the base's stale one
    assert {entry["path"]: entry["reason"] for entry in manifest["skipped"]} == NOT_COPIED
    copied = {entry["path"]: entry for entry in manifest["copied"]}
    assert set(NESTED) <= set(copied)
    assert all(entry["sha256"] == _sha256(inputs.out / name) and entry["from"] == "base"
               for name, entry in copied.items())
    outputs = {entry["path"] for entry in manifest["outputs"]}
    assert set(copied) <= outputs and "1_Pooling/config.json" in outputs
    hashed_inputs = {entry["path"] for entry in manifest["base"]["files"]}
    assert "1_Pooling/config.json" in hashed_inputs and "pytorch_model.bin" not in hashed_inputs


def test_module_weights_need_modules_json(inputs: Inputs) -> None:
    """Weights in a sub-folder are copied only for a sentence-transformers module that modules.json names."""
    _dress(inputs.base)
    (inputs.base / "modules.json").write_text("[]")
    skipped = {s.path: s.reason for s in plan_merge(inputs.base, [AdapterSpec(inputs.lora)]).base.survey.skipped}
    assert skipped["2_Dense/model.safetensors"] == WEIGHTS_REASON


def test_links_inside_are_copied_as_files_and_links_to_folders_are_not_followed(inputs: Inputs) -> None:
    real = inputs.base / "real"
    real.mkdir()
    (real / "special_tokens.txt").write_text("<s>\n")
    (inputs.base / "linked.txt").symlink_to(real / "special_tokens.txt")
    (inputs.base / "loop").symlink_to(inputs.base)
    (inputs.base / "nowhere.json").symlink_to(inputs.base / "missing.json")
    merge(inputs.base, [AdapterSpec(inputs.lora)], inputs.out, MergeOptions(allowed_roots=(inputs.base.parent,)))
    copy = inputs.out / "linked.txt"
    assert not copy.is_symlink() and copy.read_text() == "<s>\n"
    skipped = {entry["path"]: entry["reason"] for entry in read_json(inputs.out / "merge_manifest.json")["skipped"]}
    assert skipped["loop"] == "a link to a folder: not followed"
    assert skipped["nowhere.json"].startswith("a link that leads nowhere")
    assert not (inputs.out / "loop").exists()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "1_Pooling", "1_Pooling/config.json"])
def test_link_out_of_the_roots_is_an_error_even_when_it_would_be_skipped(inputs: Inputs, name: str) -> None:
    """With allowed roots every link must stay inside them, copied or not, as the service's reference check
    demands; the error names the link."""
    outside = inputs.out_parent.parent / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "file").write_text("secret\n")
    link = inputs.base / name
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(outside / ("sub" if name == "1_Pooling" else "file"))
    with pytest.raises(InputError) as caught:
        plan_merge(inputs.base, [AdapterSpec(inputs.lora)], MergeOptions(allowed_roots=(inputs.base.parent,)))
    assert (caught.value.file, caught.value.input) == (link, "base")
    assert "outside the allowed folders" in str(caught.value) and "secret" not in str(caught.value)
    assert plan_merge(inputs.base, [AdapterSpec(inputs.lora)])  # the command line follows links, as before


def test_special_files_are_skipped_with_the_reason(inputs: Inputs) -> None:
    os.mkfifo(inputs.base / "pipe")
    plan = plan_merge(inputs.base, [AdapterSpec(inputs.lora)])
    assert "pipe" not in plan.side_files
    assert [(s.path, s.reason) for s in plan.base.survey.skipped] == [("pipe", "a FIFO, not a file")]


def test_walk_is_bounded(inputs: Inputs, monkeypatch: pytest.MonkeyPatch) -> None:
    deep = inputs.base / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "d.json").write_text("{}")
    with pytest.raises(InputError, match="nested deeper than 3") as caught:
        plan_merge(inputs.base, [AdapterSpec(inputs.lora)])
    assert caught.value.file == deep / "d.json"
    shutil.rmtree(inputs.base / "a")
    monkeypatch.setattr(folder_survey, "MAX_ENTRIES", 3)
    with pytest.raises(InputError, match="holds more than 3 files") as caught:
        plan_merge(inputs.base, [AdapterSpec(inputs.lora)])
    assert caught.value.file == inputs.base


def test_failed_copy_of_a_nested_file_leaves_nothing(inputs: Inputs, monkeypatch: pytest.MonkeyPatch) -> None:
    """The output appears whole or not at all, sub-folders included."""
    _dress(inputs.base)
    copy = engine_side_files._copy

    def fail_in_subfolder(files: object, source: Path, input: object, target: Path) -> None:
        if target.parent.name == "extra":
            raise OSError(28, "No space left on device", str(target))
        copy(files, source, input, target)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_side_files, "_copy", fail_in_subfolder)
    with pytest.raises(StorageError) as caught:
        merge(inputs.base, [AdapterSpec(inputs.lora)], inputs.out)
    assert caught.value.disk_full and caught.value.file is not None and caught.value.file.name == "merges.txt"
    assert os.listdir(inputs.out_parent) == []
