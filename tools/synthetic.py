"""Synthetic Llama-shaped base models and PEFT LoRA/DoRA adapters, written without transformers.

Tests, the demo and the benchmark need real-sized models in the exact Hugging Face / PEFT layouts, but no
network downloads. Building them with transformers would hold the whole model in memory; here every tensor is
generated on its own (seeded by its name, so values do not depend on the shard layout) and each shard is
written as soon as it is full, so memory stays at about one shard. For multi-GB bases (the 8B benchmark),
`tiled` repeats one random block per tensor and streams it to disk: generation runs at disk speed in a few MB
of memory, and the merge still sees finite, normally distributed bf16 values.

CLI: `python -m tools.synthetic base OUT --preset demo`, `python -m tools.synthetic adapter BASE OUT --dora`.
"""

from __future__ import annotations

import argparse
import json
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapter_merge.worker.engine.safetensors_format import build_header
from tools.shapes import (
    DEMO,
    LLAMA_3B_SHAPE,
    PRESETS,
    TINYLLAMA_1_1B,
    LlamaShape,
    llama_tensor_shapes,
    numel,
)

__all__ = [
    "ALL_TARGETS", "DEMO", "LLAMA_3B_SHAPE", "PRESETS", "TINYLLAMA_1_1B", "LlamaShape", "llama_tensor_shapes",
    "write_llama_base", "write_lora_adapter",
]

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
}
SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
TILE_ELEMENTS = 2**22 + 1
"""Random values per tensor in a tiled base (8 MB in bf16). Odd, so it shares no factor with a row length
(a power-of-two multiple): every row starts at a different offset in the block and no two rows are equal."""
ALL_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHT_STD = 0.02
"""Standard deviation of the random weights: Llama's initializer_range, close to trained projections."""
LORA_B_STD = 5e-3
"""Makes the adapter's change a few percent of the weight, as after training, and well above bf16's ulp."""
MAGNITUDE_NOISE = 0.05
"""DoRA magnitudes are the base row norms times (1 + up to this), as after some training."""


def _generator(seed: int, name: str) -> torch.Generator:
    """One generator per tensor, keyed by name: a tensor's values do not depend on shard layout or order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _random_weight(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int,
                   count: int | None = None) -> torch.Tensor:
    """Normal(0, 0.02) for matrices; norm weights are near 1, as in a trained RMSNorm.

    With `count`, only that many values (flat) with the statistics of `shape`: a tiled tensor's block."""
    t = torch.empty(shape if count is None else (count,), dtype=dtype)
    mean, std = (1.0, 0.05) if len(shape) == 1 else (0.0, WEIGHT_STD)
    return t.normal_(mean, std, generator=_generator(seed, name))


def _write_tiled_shard(path: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: str, seed: int) -> None:
    """Stream a safetensors file whose tensors each repeat one random block of `TILE_ELEMENTS` values (a
    tensor no larger than that is fully random, as untiled): memory is one block, speed the disk's."""
    header, _ = build_header([(name, SAFETENSORS_DTYPES[dtype], shape) for name, shape in entries],
                             {"format": "pt"})
    with path.open("wb") as f:
        f.write(header)
        for name, shape in entries:
            n = numel(shape)
            block = _random_weight(name, shape, DTYPES[dtype], seed, count=min(n, TILE_ELEMENTS))
            raw = memoryview(block.view(torch.uint8).numpy())
            full, rest = divmod(n, block.numel())
            for _ in range(full):
                f.write(raw)
            f.write(raw[:rest * block.element_size()])


def _plan_shards(shapes: list[tuple[str, tuple[int, ...]]], itemsize: int,
                 max_shard_bytes: int | None) -> list[list[str]]:
    """Greedy grouping like transformers' `split_torch_state_dict_into_shards`: start a new shard when the
    next tensor would overflow the limit; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = numel(shape) * itemsize
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file creates files as 0600; make them readable like a downloaded model (other users, docker)."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(0o644)


def _llama_config(shape: LlamaShape, dtype: str) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.hidden // shape.heads,
        "vocab_size": shape.vocab,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "dtype": dtype,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048,
        "initializer_range": WEIGHT_STD,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def write_llama_base(out: Path, *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                     vocab: int, dtype: str = "bfloat16", max_shard_bytes: int | None = None,
                     seed: int = 0, tiled: bool = False) -> Path:
    """Write a random Llama-shaped model folder in Hugging Face layout; returns `out`.

    Sharded as `model-0000X-of-0000Y.safetensors` + index when it does not fit in `max_shard_bytes`,
    otherwise a single `model.safetensors`. Peak memory is about one shard, or one block when `tiled`
    (see `_write_tiled_shard`; tensors are then stored in model order, not safetensors' sorted order).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    shape = LlamaShape(hidden, intermediate, layers, heads, kv_heads, vocab, max_shard_bytes)
    shapes = llama_tensor_shapes(hidden, intermediate, layers, heads, kv_heads, vocab)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    shards = _plan_shards(shapes, itemsize, max_shard_bytes)
    shape_of = dict(shapes)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", _llama_config(shape, dtype))
    _write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "max_length": 2048})

    weight_map: dict[str, str] = {}
    for k, names in enumerate(shards, start=1):
        single = len(shards) == 1
        filename = "model.safetensors" if single else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        if tiled:
            _write_tiled_shard(out / filename, [(name, shape_of[name]) for name in names], dtype, seed)
        else:
            tensors = {name: _random_weight(name, shape_of[name], torch_dtype, seed) for name in names}
            _save_tensors(tensors, out / filename)
            del tensors
        weight_map.update(dict.fromkeys(names, filename))
    if len(shards) > 1:
        total = sum(numel(s) for _, s in shapes) * itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json(out / "model.safetensors.index.json", index)
    return out


def _base_weight_files(base: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index if the model is sharded."""
    index = base / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: base / filename for name, filename in weight_map.items()}
    single = base / "model.safetensors"
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


_TARGET = re.compile(r"^(model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+))\.weight$")


def _target_modules(files: dict[str, Path], targets: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(module path, base tensor name) for every projection named in `targets`, in layer order."""
    for name in files:
        match = _TARGET.match(name)
        if match and match.group(2) in targets:
            yield match.group(1), name


def write_lora_adapter(base: Path, out: Path, *, r: int = 16, alpha: float = 32,
                       targets: Sequence[str] = ALL_TARGETS, dora: bool = False, seed: int = 1) -> Path:
    """Write a PEFT adapter folder (config + `adapter_model.safetensors`, fp32) for `base`; returns `out`.

    lora_B is non-zero (unlike a freshly initialised adapter) so merging changes the weights. For DoRA the
    magnitude is the base weight's fp32 row norm times (1 + small noise), computed one tensor at a time.
    """
    base, out = Path(base), Path(out)
    unknown = set(targets) - set(ALL_TARGETS)
    if unknown:
        raise ValueError(f"unknown target modules {sorted(unknown)}; expected some of {ALL_TARGETS}")
    files = _base_weight_files(base)
    tensors: dict[str, torch.Tensor] = {}
    for module, weight_name in _target_modules(files, targets):
        with safe_open(str(files[weight_name]), framework="pt") as f:
            if dora:
                weight = f.get_tensor(weight_name)
                n_out, n_in = weight.shape
            else:
                n_out, n_in = f.get_slice(weight_name).get_shape()
        gen = _generator(seed, module)
        key = f"base_model.model.{module}"
        # A like PEFT's kaiming-uniform init (bound 1/sqrt(in)), B small and non-zero as after training.
        bound = 1.0 / n_in**0.5
        tensors[f"{key}.lora_A.weight"] = torch.empty(r, n_in).uniform_(-bound, bound, generator=gen)
        tensors[f"{key}.lora_B.weight"] = torch.empty(n_out, r).normal_(0.0, LORA_B_STD, generator=gen)
        if dora:
            norms = torch.linalg.vector_norm(weight.float(), dim=1)
            noise = torch.empty(n_out).uniform_(0.0, MAGNITUDE_NOISE, generator=gen)
            tensors[f"{key}.lora_magnitude_vector"] = norms * (1.0 + noise)
            del weight
    if not tensors:
        raise ValueError(f"{base}: no tensors match target modules {list(targets)}")

    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "adapter_config.json", {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "use_dora": dora,
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    })
    _save_tensors(tensors, out / "adapter_model.safetensors")
    return out


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.synthetic", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("base", help="write a random Llama-shaped base model folder")
    b.add_argument("out", type=Path)
    b.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    b.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    b.add_argument("--max-shard-bytes", type=int, help="override the preset's shard size (0: one file)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--tiled", action="store_true",
                   help=f"repeat one random block of {TILE_ELEMENTS} values per tensor: fast for multi-GB bases")
    a = sub.add_parser("adapter", help="write a PEFT LoRA/DoRA adapter for a base folder")
    a.add_argument("base", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("-r", "--rank", type=int, default=16)
    a.add_argument("--alpha", type=float, default=32)
    a.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma-separated projection names")
    a.add_argument("--dora", action="store_true")
    a.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.command == "base":
        shape = PRESETS[args.preset]
        if args.max_shard_bytes is not None:
            shape = LlamaShape(**{**asdict(shape), "max_shard_bytes": args.max_shard_bytes or None})
        print(write_llama_base(args.out, **shape, dtype=args.dtype, seed=args.seed, tiled=args.tiled))
    else:
        print(write_lora_adapter(args.base, args.out, r=args.rank, alpha=args.alpha,
                                 targets=args.targets.split(","), dora=args.dora, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
