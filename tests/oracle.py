"""The reference merge (PEFT in float64, rounded once) and the tools to compare the engine's output with it.

PEFT's own merge in the checkpoint dtype rounds more than once; in float64 its rounding error is ~1e-16,
so rounding its result once, correctly, gives the answer the engine must reproduce within 1 ulp.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from tests.builders import DTYPES, model_class

_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def load_base(base_dir: Path, dtype: torch.dtype, *, untie: bool = False,
              vocab_size: int | None = None) -> transformers.PreTrainedModel:
    """Load a base checkpoint in `dtype`; optionally untie lm_head (as a copy) and grow the vocabulary."""
    config = transformers.AutoConfig.from_pretrained(base_dir)
    cls = model_class(config)
    if untie:
        model = cls.from_pretrained(base_dir, dtype=dtype, tie_word_embeddings=False)
        with torch.no_grad():
            model.get_output_embeddings().weight.copy_(model.get_input_embeddings().weight)
    else:
        model = cls.from_pretrained(base_dir, dtype=dtype)
    if vocab_size is not None:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    return model.eval()


def load_peft(base_dir: Path, adapters: Sequence[tuple[Path, float]], dtype: torch.dtype, *,
              untie: bool = False, vocab_size: int | None = None) -> tuple[PeftModel, list[str]]:
    """The unmerged PEFT model with every adapter loaded and active, each scaled by its weight."""
    model = load_base(base_dir, dtype, untie=untie, vocab_size=vocab_size)
    names = [f"a{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(model, adapters[0][0], adapter_name=names[0])
    for name, (path, _) in zip(names[1:], adapters[1:], strict=True):
        peft_model.load_adapter(path, adapter_name=name)
    peft_model.base_model.set_adapter(names)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for name, (_, weight) in zip(names, adapters, strict=True):
                if name in module.scaling:
                    module.scaling[name] *= weight  # same as LoraLayer.set_scale(name, weight)
    return peft_model.eval(), names


def oracle_state_dict(base_dir: Path, adapters: Sequence[tuple[Path, float]], *, untie: bool = False,
                      vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload in float64: the exact merged tensors before the one final rounding.

    The merged model is saved and read back so tensor names are the on-disk ones (transformers may rename
    modules in memory) and tied weights appear exactly as a checkpoint stores them.
    """
    peft_model, names = load_peft(base_dir, adapters, torch.float64, untie=untie, vocab_size=vocab_size)
    for param in peft_model.parameters():
        assert param.dtype == torch.float64, "adapter weights must be float64 for the oracle to be exact"
    merged = peft_model.base_model.merge_and_unload(adapter_names=names)
    with tempfile.TemporaryDirectory() as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        return load_dir_tensors(Path(tmp))


def load_dir_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: single `model.safetensors` or every shard named by the index."""
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(folder / name, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                assert key not in tensors, f"{key} stored twice"
                tensors[key] = handle.get_tensor(key)
    return tensors


def round_once(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float64 values to `dtype` correctly (nearest, ties to even).

    torch converts float64 -> bf16/fp16 through float32, a double rounding that is wrong in rare ties, so
    take torch's candidate and pick the nearest of it and its two neighbours, breaking ties towards even.
    """
    if dtype in (torch.float32, torch.float64) or not exact.is_floating_point():
        return exact.to(dtype)
    candidate = exact.to(dtype)
    bits = candidate.view(torch.int16).to(torch.int32) & 0xFFFF
    sign, magnitude = bits & 0x8000, bits & 0x7FFF
    patterns = torch.stack([bits, sign | (magnitude - 1).clamp(min=0), sign | (magnitude + 1)])
    options = torch.where(patterns >= 0x8000, patterns - 0x10000, patterns).to(torch.int16).view(dtype)
    error = (options.double() - exact.unsqueeze(0)).abs()
    nearest = error == error.min(dim=0).values.unsqueeze(0)
    even_nearest = nearest & (patterns & 1 == 0)
    choice = torch.where(even_nearest.any(dim=0), even_nearest.int().argmax(dim=0), nearest.int().argmax(dim=0))
    result = options.gather(0, choice.unsqueeze(0)).squeeze(0)
    return torch.where(torch.isfinite(candidate), result, candidate)


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Map floats to integers in the same order, so ulp distance is a subtraction (-0 and +0 are equal)."""
    int_dtype = _BITS[t.dtype]
    width = torch.iinfo(int_dtype).bits
    bits = t.contiguous().view(int_dtype).to(torch.int64) & ((1 << width) - 1)
    sign = 1 << (width - 1)
    return torch.where(bits >= sign, -(bits - sign), bits)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place between two tensors of one float dtype."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    return (ordered_bits(a) - ordered_bits(b)).abs()


def change_rel_error(ours: torch.Tensor, exact: torch.Tensor, base: torch.Tensor) -> float:
    """||ours - base - (exact - base)|| / ||exact - base||: the error relative to what the adapter changed."""
    change = (exact.double() - base.double()).norm()
    return float((ours.double() - exact.double()).norm() / change)


def torch_dtype(name: str, base_dtype: torch.dtype) -> torch.dtype:
    """Output dtype for an option value ('auto' keeps the base dtype)."""
    return base_dtype if name == "auto" else DTYPES[name]
