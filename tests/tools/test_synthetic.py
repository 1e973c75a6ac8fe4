"""The synthetic models must be what transformers and PEFT load without complaint, or tests built on them
would test a layout nobody uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tools.synthetic import LlamaShape, write_llama_base, write_lora_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TINY = LlamaShape(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=256,
                  max_shard_bytes=60_000)


def _load_base(base: Path) -> torch.nn.Module:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.bfloat16, output_loading_info=True)
    assert not any(info.values()), info
    return model


def _written_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def test_sharded_base_loads_with_transformers(tmp_path: Path) -> None:
    base = write_llama_base(tmp_path / "base", **TINY)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in base.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    written = _written_tensors(base)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())

    model = _load_base(base)
    state = model.state_dict()
    assert set(state) == set(written)
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor), name


def test_single_file_base_and_seed(tmp_path: Path) -> None:
    shape = {**TINY, "max_shard_bytes": None}
    a = write_llama_base(tmp_path / "a", **shape, dtype="float16", seed=3)
    b = write_llama_base(tmp_path / "b", **{**TINY, "max_shard_bytes": 30_000}, dtype="float16", seed=3)
    assert [p.name for p in a.glob("*.safetensors")] == ["model.safetensors"]
    # Values depend on the seed and the tensor name only, not on the shard layout.
    ta, tb = _written_tensors(a), _written_tensors(b)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert _load_base(a).dtype == torch.bfloat16  # loads (and converts) without errors


@pytest.mark.parametrize("dora", [False, True])
def test_adapter_loads_with_peft_and_matches_written_values(tmp_path: Path, dora: bool) -> None:
    base = write_llama_base(tmp_path / "base", **TINY)
    adapter = write_lora_adapter(base, tmp_path / "adapter", r=4, alpha=8, dora=dora)
    written = load_file(adapter / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in written.values())

    model = peft.PeftModel.from_pretrained(_load_base(base), adapter)
    loaded = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            # PEFT keeps the adapter name in the module path; the file does not.
            key = name.replace(".default", "")
            loaded[key.removesuffix(".weight") if "magnitude" in key else key] = param
    assert set(loaded) == set(written)
    for name, tensor in written.items():
        assert torch.equal(loaded[name].detach(), tensor), name
    if dora:
        assert all((t > 0).all() for k, t in written.items() if k.endswith("lora_magnitude_vector"))
    assert any(t.abs().sum() > 0 for k, t in written.items() if ".lora_B." in k)
