"""Llama model shapes and the benchmark/demo presets: plain Python, no torch.

Kept apart from `tools.synthetic` so that the benchmark's parent process can use them without importing torch:
a forked child's `ru_maxrss` starts at its parent's RSS, so a heavy parent would inflate every measured peak.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions `write_llama_base` takes; `write_llama_base(out, **PRESET)` works (it is a mapping)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_shard_bytes: int | None = None

    def keys(self) -> list[str]:
        return list(asdict(self))

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def param_count(self) -> int:
        shapes = llama_tensor_shapes(self.hidden, self.intermediate, self.layers, self.heads, self.kv_heads,
                                     self.vocab)
        return sum(numel(shape) for _, shape in shapes)


TINYLLAMA_1_1B = LlamaShape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000,
                            max_shard_bytes=10**9)
LLAMA_3B_SHAPE = LlamaShape(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8, vocab=32000,
                            max_shard_bytes=10**9)
LLAMA_3_8B_SHAPE = LlamaShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256,
                              max_shard_bytes=5 * 10**9)
"""Llama-3-8B's dimensions and Hugging Face's default 5 GB shards: about 16 GB in bf16 (`make bench-8b`)."""
DEMO = LlamaShape(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=2, vocab=2048,
                  max_shard_bytes=3 * 10**6)
"""About 7.6 MB in bf16, in 3 shards: big enough to exercise sharding, small enough for a quick demo."""
PRESETS: dict[str, LlamaShape] = {"tinyllama-1.1b": TINYLLAMA_1_1B, "llama-3b": LLAMA_3B_SHAPE,
                                  "llama-3-8b": LLAMA_3_8B_SHAPE, "demo": DEMO}


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def llama_tensor_shapes(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                        vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama tensor names and shapes, in `state_dict` order (the order save_pretrained shards them in)."""
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden {hidden} must divide by heads {heads}, and heads by kv_heads {kv_heads}")
    kv_dim = hidden // heads * kv_heads
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv_dim, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv_dim, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.mlp.gate_proj.weight", (intermediate, hidden)),
            (f"{p}.mlp.up_proj.weight", (intermediate, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, intermediate)),
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes
