"""Plan a merge from headers and configs alone: every check that can fail on bad input happens here.

The plan says, for each output tensor, where its starting value lies, which adapter operations apply in
which order, its output dtype and its shard. Building it reads no tensor data and imports no torch, so a
caller can run it as a preflight and the pipeline can write shard headers before computing anything.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter_merge.worker.engine.adapter import Adapter, load_adapter, split_key
from adapter_merge.worker.engine.base_model import SINGLE_FILE, BaseModel, load_base_model
from adapter_merge.worker.engine.errors import InputError, UnsupportedOptionError
from adapter_merge.worker.engine.name_mapping import find_rewrite
from adapter_merge.worker.engine.operations import BiasOp, Layout, LoraOp, Op, OutputTensor, TokenRowsOp
from adapter_merge.worker.engine.safetensors_format import FLOAT_DTYPES, FP8_DTYPES, TensorInfo, same_bytes
from adapter_merge.worker.engine.spec import AdapterSpec, MergeOptions

# GPT-2-style models store these Linear-like layers as Conv1D, (in, out): a property of the architecture,
# since shapes cannot tell (square matrices) and `fan_in_fan_out` in adapter configs is not reliable.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
CONV1D_MODULES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
OUTPUT_EMBEDDING_MODULES = ("lm_head", "cls.predictions.decoder", "embed_out")
INPUT_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "shared.weight",
    "tok_embeddings.weight",
)
OUTPUT_DTYPE_CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass
class MergePlan:
    base: BaseModel
    adapters: tuple[Adapter, ...]
    options: MergeOptions
    shards: dict[str, list[OutputTensor]]
    """Output file name -> tensors in write order."""
    config: dict[str, Any]
    """The config.json to write."""
    notes: list[str] = field(default_factory=list)

    @property
    def outputs(self) -> list[OutputTensor]:
        return [tensor for tensors in self.shards.values() for tensor in tensors]

    @property
    def bytes_total(self) -> int:
        return sum(tensor.nbytes for tensor in self.outputs)

    @property
    def index_needed(self) -> bool:
        return list(self.shards) != [SINGLE_FILE]

    def summary(self) -> dict[str, Any]:
        outputs = self.outputs
        return {
            "tensors_total": len(outputs),
            "tensors_merged": sum(1 for tensor in outputs if tensor.changed),
            "bytes_total": self.bytes_total,
            "shards": list(self.shards),
            "notes": list(self.notes),
        }


def plan_merge(
    base_dir: Path | str, adapters: Sequence[AdapterSpec], options: MergeOptions | None = None
) -> MergePlan:
    """Check that the adapters fit the base and describe the merge; reads headers only, writes nothing."""
    options = options or MergeOptions()
    if not adapters:
        raise InputError("adapters: at least one adapter is required")
    base = load_base_model(Path(base_dir))
    for info in base.tensors.values():
        if info.dtype in FP8_DTYPES:
            raise UnsupportedOptionError(
                f"{info.file}: tensor {info.name!r} is {info.dtype}; fp8 bases are not supported"
            )
    builder = _PlanBuilder(base, options)
    loaded = tuple(load_adapter(Path(spec.path), index, spec.weight) for index, spec in enumerate(adapters))
    for adapter in loaded:
        builder.add(adapter)
    return builder.finish(loaded)


class _PlanBuilder:
    def __init__(self, base: BaseModel, options: MergeOptions) -> None:
        self.base = base
        self.options = options
        self.sources: dict[str, TensorInfo] = {}
        self.ops: dict[str, list[Op]] = defaultdict(list)
        self.notes: list[str] = []
        self.input_embedding = self._find_input_embedding()
        self.tied = bool(base.config.get("tie_word_embeddings", True)) and self.input_embedding is not None
        self.head_name: str | None = None
        """Set when an adapter touches a tied output embedding that the checkpoint does not store."""

    def _find_input_embedding(self) -> str | None:
        found = [name for name in self.base.tensors if name.endswith(INPUT_EMBEDDING_SUFFIXES)]
        return found[0] if len(found) == 1 else None

    def _is_tied_head(self, name: str) -> bool:
        return self.tied and name not in self.base.tensors and _is_output_embedding(name)

    # -- one adapter ----------------------------------------------------------------------------------------

    def add(self, adapter: Adapter) -> None:
        modules: dict[str, dict[str, TensorInfo]] = defaultdict(dict)
        wrapped_copies: dict[str, TensorInfo] = {}
        for key, info in adapter.tensors.items():
            module, role = split_key(adapter, key)
            if role == "wrapped_copy":
                wrapped_copies[module] = info
            elif role != "base_copy":
                modules[module][role] = info
        for module, info in wrapped_copies.items():
            modules[module].setdefault("replacement", info)
        wanted = {name for module, roles in modules.items() for name in _target_names(module, roles)}
        heads = {name for name in wanted if self._is_tied_head(name)}
        rewrite = find_rewrite(sorted(wanted - heads), self.base.tensors.keys(), adapter.weights_file)

        def base_name(name: str) -> str:
            return rewrite(name) if rewrite.applies_to(name) else name

        for head in heads:
            self._claim_head(base_name(head), adapter)
        for module, roles in modules.items():
            if "replacement" in roles:
                self._replace(base_name(module), roles.pop("replacement"), adapter)
            if roles:
                self._add_module_ops(adapter, module, base_name(module + ".weight"), roles)

    def _claim_head(self, name: str, adapter: Adapter) -> None:
        if self.head_name not in (None, name):
            raise InputError(f"{adapter.weights_file}: output embedding {name!r} differs from {self.head_name!r}")
        self.head_name = name

    def _replace(self, name: str, info: TensorInfo, adapter: Adapter) -> None:
        if name in self.sources:
            self.notes.append(f"{name}: replacement from {adapter.label} supersedes an earlier adapter's")
        self.sources[name] = info

    def _add_module_ops(self, adapter: Adapter, module: str, weight_name: str, roles: dict[str, TensorInfo]) -> None:
        where = f"{adapter.weights_file}: module {module!r}"
        scale = adapter.config.scaling(module) * adapter.weight
        if "token_rows" in roles:
            indices = tuple(adapter.config.token_indices(module))
            self.ops[weight_name].append(TokenRowsOp(adapter.index, roles.pop("token_rows"), indices))
        if "lora_bias" in roles:
            bias_name = weight_name.removesuffix(".weight") + ".bias"
            self.ops[bias_name].append(BiasOp(adapter.index, roles.pop("lora_bias"), scale))
        if "embedding_A" in roles or "embedding_B" in roles:
            lora_a, lora_b, layout = roles.pop("embedding_A", None), roles.pop("embedding_B", None), "columns"
        else:
            lora_a, lora_b = roles.pop("lora_A", None), roles.pop("lora_B", None)
            layout = "columns" if self._is_conv1d(module) else "rows"
        magnitude = roles.pop("magnitude", None)
        if roles:
            raise InputError(f"{where} has unexpected tensors {sorted(roles)}")
        if lora_a is None and lora_b is None:
            if magnitude is not None:
                raise InputError(f"{where} has a DoRA magnitude but no LoRA A/B tensors")
            return
        if lora_a is None or lora_b is None:
            raise InputError(f"{where} has only one of its LoRA A/B tensors")
        if magnitude is not None and not adapter.config.use_dora:
            raise InputError(f"{where} has a DoRA magnitude but use_dora is false in {adapter.config.path}")
        if magnitude is None and adapter.config.use_dora:
            raise InputError(f"{where} has no lora_magnitude_vector but use_dora is true")
        if lora_a.shape[0] != adapter.config.rank(module):
            raise InputError(
                f"{where}: tensor {lora_a.name!r} has rank {lora_a.shape[0]} "
                f"but the config says r={adapter.config.rank(module)}"
            )
        self.ops[weight_name].append(LoraOp(adapter.index, module, layout, lora_a, lora_b, scale, magnitude))

    def _is_conv1d(self, module: str) -> bool:
        return self.base.model_type in CONV1D_MODEL_TYPES and module.rsplit(".", 1)[-1] in CONV1D_MODULES

    # -- the whole plan -------------------------------------------------------------------------------------

    def finish(self, adapters: tuple[Adapter, ...]) -> MergePlan:
        outputs = {
            name: OutputTensor(name, self.sources.get(name, info), "", replaced=name in self.sources)
            for name, info in self.base.tensors.items()
        }
        for name in self.sources:
            if name not in outputs and name != self.head_name:
                raise InputError(f"{self.sources[name].file}: tensor {self.sources[name].name!r} replaces "
                                 f"{name!r}, which the base model does not have")
        for name, ops in self.ops.items():
            if name not in outputs and name != self.head_name:
                raise InputError(f"{ops[0].__class__.__name__} target {name!r} is not a tensor of the base model")
            if name in outputs:
                outputs[name].ops = ops
        head = self._untied_head(outputs)
        tensors = [*outputs.values(), *([head] if head else [])]
        config = dict(self.base.config)
        self._check_vocab(tensors, config)
        if head is not None:
            config["tie_word_embeddings"] = False
        for tensor in tensors:
            tensor.dtype = self._output_dtype(tensor)
            for op in tensor.ops:
                _check_op_shapes(tensor, op, adapters[op.adapter])
        shards = self._assign_shards(outputs, head)
        if self.options.dtype != "auto":
            config["torch_dtype"] = self.options.dtype
            if "dtype" in config:  # transformers 5's name for it
                config["dtype"] = self.options.dtype
        return MergePlan(self.base, adapters, self.options, shards, config, self.notes)

    def _untied_head(self, outputs: dict[str, OutputTensor]) -> OutputTensor | None:
        """A separate output embedding when adapters make the tied pair differ; None keeps them tied."""
        embed = outputs.get(self.input_embedding or "")
        if not self.tied or embed is None:
            return None
        name = self.head_name or "lm_head.weight"
        head_ops = list(self.ops.get(name, []))
        token_ops = [op for op in embed.ops if isinstance(op, TokenRowsOp)]
        embed_lora = len(embed.ops) > len(token_ops)  # trainable tokens apply to both sides of a tied pair
        head_source = self.sources.get(name)
        head_replaced = head_source is not None and not same_bytes(head_source, embed.source)
        if not (embed_lora or head_ops or head_replaced):
            return None
        head = OutputTensor(name, head_source or embed.source, "", ops=token_ops + head_ops, replaced=True)
        self.notes.append(
            f"tie_word_embeddings: the adapters change {embed.name} and {name} differently, so the output is "
            f"untied: {name} is written separately and config.json says tie_word_embeddings=false"
        )
        return head

    def _check_vocab(self, tensors: list[OutputTensor], config: dict[str, Any]) -> None:
        """A saved, resized embedding changes the vocabulary: every vocabulary-sized tensor must agree."""
        base = self.base.tensors
        resized = [t for t in tensors if t.replaced and t.name in base and t.shape != base[t.name].shape]
        for tensor in resized:
            base_shape = self.base.tensors[tensor.name].shape
            if len(base_shape) != 2 or tensor.shape[1:] != base_shape[1:]:
                raise InputError(f"{tensor.source.file}: tensor {tensor.source.name!r} has shape "
                                 f"{list(tensor.shape)}, the base's {tensor.name!r} has {list(base_shape)}")
        if not resized:
            return
        vocab = {tensor.shape[0] for tensor in resized}
        for tensor in tensors:
            is_embedding = tensor.name == self.input_embedding or _is_output_embedding(tensor.name)
            if (is_embedding or tensor in resized) and (len(vocab) > 1 or tensor.shape[0] not in vocab):
                raise InputError(
                    f"the adapters resize the vocabulary to {sorted(vocab)} rows but {tensor.name!r} has "
                    f"{tensor.shape[0]}; merge onto the resized base model, or save that tensor with the adapter"
                )
        config["vocab_size"] = vocab.pop()
        self.notes.append(f"vocab_size: {config['vocab_size']}, from an embedding saved with the adapter")

    def _base_info(self, tensor: OutputTensor) -> TensorInfo:
        """The base tensor an output stems from: its own, or for an untied head the shared embedding."""
        return self.base.tensors.get(tensor.name) or self.base.tensors[self.input_embedding or ""]

    def _output_dtype(self, tensor: OutputTensor) -> str:
        base_info = self._base_info(tensor)
        if base_info.dtype not in FLOAT_DTYPES:
            if tensor.ops:
                raise InputError(f"tensor {tensor.name!r} is {base_info.dtype}; adapters can only change float tensors")
            return base_info.dtype
        if self.options.dtype == "auto":
            return base_info.dtype
        return OUTPUT_DTYPE_CODES[self.options.dtype]

    def _assign_shards(
        self, outputs: dict[str, OutputTensor], head: OutputTensor | None
    ) -> dict[str, list[OutputTensor]]:
        ordered: list[OutputTensor] = []
        for shard in self.base.shards:
            for name in shard.tensors:
                ordered.append(outputs[name])
                if head is not None and name == self.input_embedding:
                    ordered.append(head)
        limit = self.options.max_shard_size
        if limit is None:
            for tensor in ordered:
                tensor.shard = self._base_info(tensor).file.name
        else:
            _pack(ordered, limit)
        shards: dict[str, list[OutputTensor]] = {}
        for tensor in ordered:
            shards.setdefault(tensor.shard, []).append(tensor)
        return shards


def _pack(ordered: list[OutputTensor], limit: int) -> None:
    """Greedy re-sharding in model order, with Hugging Face's shard names; a tensor over the limit sits alone."""
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in ordered:
        if groups[-1] and size + tensor.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    for number, group in enumerate(groups, start=1):
        name = SINGLE_FILE if len(groups) == 1 else f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        for tensor in group:
            tensor.shard = name


def _is_output_embedding(name: str) -> bool:
    module = name.removesuffix(".weight")
    return name.endswith(".weight") and any(module == m or module.endswith("." + m) for m in OUTPUT_EMBEDDING_MODULES)


def _target_names(module: str, roles: dict[str, TensorInfo]) -> list[str]:
    """Base tensor names one adapter module needs: its weight, its bias for lora_bias, or what it replaces."""
    names = []
    if "replacement" in roles:
        names.append(module)
    if set(roles) - {"replacement", "lora_bias"}:
        names.append(module + ".weight")
    if "lora_bias" in roles:
        names.append(module + ".bias")
    return names


def _check_op_shapes(tensor: OutputTensor, op: Op, adapter: Adapter) -> None:
    where = f"{adapter.weights_file}: module {getattr(op, 'module', tensor.name)!r}"
    shape = tensor.shape
    if isinstance(op, BiasOp):
        if op.lora_bias.shape != shape:
            raise InputError(f"{where}: tensor {op.lora_bias.name!r} has shape {list(op.lora_bias.shape)}, "
                             f"the base bias {tensor.name!r} has {list(shape)}")
        return
    if isinstance(op, TokenRowsOp):
        rows = op.rows.shape
        if len(shape) != 2 or len(rows) != 2 or rows != (len(op.indices), shape[1]):
            raise InputError(f"{where}: tensor {op.rows.name!r} has shape {list(rows)}, expected "
                             f"[{len(op.indices)}, {shape[1] if len(shape) == 2 else '?'}] for {tensor.name!r}")
        if not all(0 <= index < shape[0] for index in op.indices):
            raise InputError(f"{adapter.config.path}: trainable_token_indices has an index outside 0..{shape[0] - 1}")
        return
    _check_lora_shapes(tensor, op, where)


def _check_lora_shapes(tensor: OutputTensor, op: LoraOp, where: str) -> None:
    shape = tensor.shape
    if len(shape) < 2:
        raise InputError(f"{where}: base tensor {tensor.name!r} has shape {list(shape)}; LoRA needs a matrix")
    rows, cols = shape[0], math.prod(shape[1:])
    a, b = op.lora_a.shape, op.lora_b.shape
    r = a[0]
    if len(shape) > 2:  # ConvNd: A is a conv with the base's kernel, B a 1x1 conv
        if a[1:] != shape[1:]:
            raise UnsupportedOptionError(f"{where}: tensor {op.lora_a.name!r} has shape {list(a)} but the base "
                                         f"conv {tensor.name!r} has {list(shape)} (groups>1 is not supported)")
        if len(b) != len(shape) or any(d != 1 for d in b[2:]):
            raise InputError(f"{where}: tensor {op.lora_b.name!r} has shape {list(b)}, expected a 1x1 conv")
        a, b = (r, cols), (b[0], b[1])
    expected_a, expected_b = _expected_ab(op.layout, rows, cols, r)
    for info, got, expected in ((op.lora_a, a, expected_a), (op.lora_b, b, expected_b)):
        if tuple(got) != expected:
            raise InputError(f"{where}: tensor {info.name!r} has shape {list(info.shape)}, "
                             f"expected {list(expected)} for base tensor {tensor.name!r} {list(shape)}")
    if op.magnitude is not None:
        units = rows if op.layout == "rows" else cols
        if op.magnitude.numel != units:
            raise InputError(f"{where}: tensor {op.magnitude.name!r} has {op.magnitude.numel} values, "
                             f"expected {units} for base tensor {tensor.name!r}")


def _expected_ab(layout: Layout, rows: int, cols: int, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
    if layout == "rows":
        return (r, cols), (rows, r)
    return (r, rows), (cols, r)
