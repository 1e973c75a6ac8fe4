"""What a merge plan would do, as plain data: what each adapter touches and what the output will be.

For showing a plan before running it (`adapter-merge inspect`); built from the plan alone, so it reads no
tensor data and needs no torch.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from adapter_merge.worker.engine.operations import BiasOp, DoraOp, LoraOp, Operation, TokenRowsOp
from adapter_merge.worker.engine.plan import MergePlan

KINDS = ("lora", "dora", "embedding", "lora_bias", "trainable_tokens", "replaced")
"""What an adapter does to a tensor: a LoRA or DoRA delta, a LoRA on an embedding, a `lora_bias`, replaced
token rows, or the whole tensor replaced (`modules_to_save`, a saved embedding, `bias="all"`)."""


def _kind(op: Operation) -> str:
    if isinstance(op, DoraOp):
        return "dora"
    if isinstance(op, LoraOp):
        return "embedding" if op.lora_a.name.endswith(".lora_embedding_A") else "lora"
    if isinstance(op, BiasOp):
        return "lora_bias"
    assert isinstance(op, TokenRowsOp), op
    return "trainable_tokens"


def describe_plan(plan: MergePlan) -> dict[str, Any]:
    """The base, each adapter's effect (tensors, modules, kinds), the output's dtypes, size and shards, the
    files copied and skipped, and the plan's notes."""
    touched: dict[int, dict[str, set[str]]] = {adapter.index: {} for adapter in plan.adapters}
    for tensor in plan.outputs:
        effects = [(op.adapter, _kind(op)) for op in tensor.ops]
        if tensor.replaced and isinstance(tensor.source.input, int):
            effects.append((tensor.source.input, "replaced"))
        for adapter, kind in effects:
            touched[adapter].setdefault(tensor.name, set()).add(kind)
    adapters = []
    for adapter in plan.adapters:
        tensors = touched[adapter.index]
        kinds = Counter(kind for found in tensors.values() for kind in found)
        adapters.append({
            "index": adapter.index, "path": adapter.shown, "weight": adapter.weight,
            "r": adapter.config.r, "lora_alpha": adapter.config.alpha, "use_rslora": adapter.config.use_rslora,
            "tensors": len(tensors), "modules": len({name.rsplit(".", 1)[0] for name in tensors}),
            "kinds": {kind: kinds[kind] for kind in KINDS if kinds[kind]},
        })
    shards = [{"name": name, "tensors": len(tensors), "bytes": sum(t.nbytes for t in tensors)}
              for name, tensors in plan.shards.items()]
    return {
        "base": {"path": plan.files.shown(plan.base.root), "model_type": plan.base.model_type,
                 "tensors": len(plan.base.tensors), "bytes": sum(t.nbytes for t in plan.base.tensors.values())},
        "adapters": adapters,
        "output": {
            "dtype": plan.options.dtype,
            "tensor_dtypes": dict(Counter(tensor.dtype for tensor in plan.outputs)),
            "tensors": len(plan.outputs), "tensors_changed": sum(1 for t in plan.outputs if t.changed),
            "bytes": plan.bytes_total, "shards": shards,
            "copied": sorted(plan.side_files),
            "skipped": [{"path": s.path, "reason": s.reason} for s in plan.base.survey.skipped],
        },
        "notes": list(plan.notes),
    }
