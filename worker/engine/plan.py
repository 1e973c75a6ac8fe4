"""Plan a merge from headers and configs: every check that can fail on bad input happens here.

The plan says, for each output tensor, where its starting value lies, which adapter operations apply in
which order, its output dtype and its shard. Building it imports no torch and reads no tensor data, with
one exception: when an adapter saves the output embedding of a tied pair, that tensor's bytes are compared
with the input embedding's (`same_bytes`) to know whether the pair can stay tied. So a caller can run it as
a preflight, and the pipeline can write shard headers before computing anything.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter_merge.worker.engine.adapter import FP32_MAX, Adapter, load_adapter, split_key
from adapter_merge.worker.engine.base_model import SINGLE_FILE, BaseModel, load_base_model
from adapter_merge.worker.engine.errors import InputError, InputRef, UnsupportedOptionError
from adapter_merge.worker.engine.input_files import InputFiles
from adapter_merge.worker.engine.name_mapping import find_rewrite
from adapter_merge.worker.engine.operations import (
    BiasOp,
    DoraOp,
    LoraOp,
    Operation,
    OutputTensor,
    TensorContent,
    TokenRowsOp,
)
from adapter_merge.worker.engine.safetensors_format import same_bytes
from adapter_merge.worker.engine.side_files import choose_side_files
from adapter_merge.worker.engine.spec import AdapterSpec, MergeOptions
from adapter_merge.worker.engine.tensor_info import DTYPE_SIZES, FLOAT_DTYPES, FP8_DTYPES, TensorInfo

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
    files: InputFiles
    """How every input file is opened (within `options.allowed_roots`)."""
    side_files: dict[str, tuple[Path, InputRef]]
    """Output path (relative) -> the input file copied there (tokenizer, generation config, pooling config,
    ...) and its input."""
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

    def shard_index(self) -> dict[str, Any] | None:
        """The model.safetensors.index.json to write, or None for a single file."""
        if not self.index_needed:
            return None
        return {"metadata": {"total_size": self.bytes_total},
                "weight_map": {tensor.name: tensor.shard for tensor in self.outputs}}

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
    """Check that the adapters fit the base and describe the merge; writes nothing. It reads headers and
    configs, and no tensor data but a tied pair's saved output embedding (see the module docstring)."""
    options = options or MergeOptions()
    if not adapters:
        raise InputError("adapters: at least one adapter is required", option="adapters")
    files = InputFiles(options.allowed_roots, options.await_file, options.input_names)
    base = load_base_model(Path(base_dir), files)
    for info in base.tensors.values():
        if info.dtype in FP8_DTYPES:
            raise UnsupportedOptionError(
                f"{info.file}: tensor {info.name!r} is {info.dtype}; fp8 bases are not supported",
                file=info.file, tensor=info.name, input="base",
            )
    builder = _PlanBuilder(base, options, files)
    loaded = tuple(load_adapter(Path(spec.path), index, spec.weight, files) for index, spec in enumerate(adapters))
    for adapter in loaded:
        builder.add(adapter)
    return builder.finish(loaded)


class _PlanBuilder:
    def __init__(self, base: BaseModel, options: MergeOptions, files: InputFiles) -> None:
        self.base = base
        self.options = options
        self.files = files
        self.sources: dict[str, TensorInfo] = {}
        """Output name -> the adapter tensor that replaces its starting value."""
        self.ops: dict[str, list[Operation]] = defaultdict(list)
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
        rewrite = find_rewrite(sorted(wanted - heads), self.base.tensors.keys(), adapter.weights_file, adapter.index)

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
            raise InputError(f"{adapter.weights_file}: output embedding {name!r} differs from {self.head_name!r}",
                             file=adapter.weights_file, tensor=name, input=adapter.index)
        self.head_name = name

    def _replace(self, name: str, info: TensorInfo, adapter: Adapter) -> None:
        if info.dtype in FP8_DTYPES:
            raise UnsupportedOptionError(f"{info.file}: tensor {info.name!r} is {info.dtype}; fp8 tensors are not "
                                         f"supported", file=info.file, tensor=info.name, input=adapter.index)
        if name in self.sources:
            self.notes.append(f"{name}: replacement from {adapter.label} supersedes an earlier adapter's")
        self.sources[name] = info

    def _add_module_ops(self, adapter: Adapter, module: str, weight_name: str, roles: dict[str, TensorInfo]) -> None:
        where = f"{adapter.weights_file}: module {module!r}"

        def error(message: str, tensor: TensorInfo | None, option: str | None = None) -> InputError:
            return InputError(message, file=adapter.weights_file, tensor=tensor.name if tensor else None,
                              option=option, input=adapter.index)

        for info in roles.values():
            if info.dtype not in FLOAT_DTYPES:
                raise error(f"{where}: tensor {info.name!r} is {info.dtype}; LoRA tensors must be "
                            f"{', '.join(sorted(FLOAT_DTYPES))}", info)
        scale = self._scale(adapter, module) if roles.keys() - {"token_rows"} else 0.0
        if "token_rows" in roles:
            indices = tuple(adapter.config.token_indices(module))
            self.ops[weight_name].append(
                TokenRowsOp(adapter.index, rows=roles.pop("token_rows"), indices=indices, config=adapter.config.path)
            )
        if "lora_bias" in roles:
            bias_name = weight_name.removesuffix(".weight") + ".bias"
            self.ops[bias_name].append(BiasOp(adapter.index, lora_bias=roles.pop("lora_bias"), scale=scale))
        if "embedding_A" in roles or "embedding_B" in roles:
            lora_a, lora_b, layout = roles.pop("embedding_A", None), roles.pop("embedding_B", None), "columns"
        else:
            lora_a, lora_b = roles.pop("lora_A", None), roles.pop("lora_B", None)
            layout = "columns" if self._is_conv1d(module) else "rows"
        magnitude = roles.pop("magnitude", None)
        if roles:
            raise error(f"{where} has unexpected tensors {sorted(roles)}", roles[min(roles)])
        if lora_a is None and lora_b is None:
            if magnitude is not None:
                raise error(f"{where} has a DoRA magnitude but no LoRA A/B tensors", magnitude)
            return
        if lora_a is None or lora_b is None:
            raise error(f"{where} has only one of its LoRA A/B tensors", lora_a or lora_b)
        if magnitude is not None and not adapter.config.use_dora:
            raise error(f"{where} has a DoRA magnitude but use_dora is false in {adapter.config.path}", magnitude,
                        "use_dora")
        if magnitude is None and adapter.config.use_dora:
            raise error(f"{where} has no lora_magnitude_vector but use_dora is true", lora_a, "use_dora")
        for factor in (lora_a, lora_b):
            if len(factor.shape) < 2:
                raise error(f"{where}: tensor {factor.name!r} has shape {list(factor.shape)}; LoRA factors have "
                            f"at least 2 dimensions", factor)
        if lora_a.shape[0] != adapter.config.rank(module):
            raise error(f"{where}: tensor {lora_a.name!r} has rank {lora_a.shape[0]} "
                        f"but the config says r={adapter.config.rank(module)}", lora_a, "r")
        if magnitude is None:
            op: LoraOp = LoraOp(adapter.index, module, layout, lora_a, lora_b, scale)
        else:
            op = DoraOp(adapter.index, module, layout, lora_a, lora_b, scale, magnitude)
        self.ops[weight_name].append(op)

    @staticmethod
    def _scale(adapter: Adapter, module: str) -> float:
        """PEFT's scale times the adapter's weight, which the merge multiplies float32 values by: refused
        unless it is a finite float32, naming what made it too large (lora_alpha, alpha_pattern or weights)."""
        scaling = adapter.config.scaling(module)
        scale = scaling * adapter.weight
        if abs(scale) <= FP32_MAX:
            return scale
        if abs(scaling) <= FP32_MAX:
            raise InputError(f"{adapter.label}: weight {adapter.weight:g} times the scale {scaling:g} of module "
                             f"{module!r} does not fit float32", option="weights", input=adapter.index)
        option = adapter.config.alpha_option(module)
        raise InputError(f"{adapter.config.path}: module {module!r}: {option} makes the scale {scaling:g}, which "
                         f"does not fit float32", file=adapter.config.path, option=option, input=adapter.index)

    def _is_conv1d(self, module: str) -> bool:
        return self.base.model_type in CONV1D_MODEL_TYPES and module.rsplit(".", 1)[-1] in CONV1D_MODULES

    # -- the whole plan -------------------------------------------------------------------------------------

    def finish(self, adapters: tuple[Adapter, ...]) -> MergePlan:
        """Every output tensor, checked and built whole: its content first, then its dtype and shard."""
        self._check_targets()
        contents = [
            TensorContent(name, self.sources.get(name, info), tuple(self.ops.get(name, ())), name in self.sources)
            for name, info in self.base.tensors.items()
        ]
        embed = next((content for content in contents if content.name == self.input_embedding), None)
        head = self._untied_head(embed)
        if embed is not None and head is not None:  # written right after the input embedding it was tied to
            contents.insert(contents.index(embed) + 1, head)
        config = dict(self.base.config)
        self._check_vocab(contents, config)
        if head is not None:
            config["tie_word_embeddings"] = False
        dtypes = [self._output_dtype(content) for content in contents]
        for content in contents:
            for op in content.ops:
                op.check(content.name, content.shape)
        shards: dict[str, list[OutputTensor]] = {}
        for content, dtype, shard in zip(contents, dtypes, self._shard_names(contents, dtypes), strict=True):
            tensor = OutputTensor(content.name, content.source, content.ops, content.replaced, dtype=dtype, shard=shard)
            shards.setdefault(shard, []).append(tensor)
        if self.options.dtype != "auto":
            config["torch_dtype"] = self.options.dtype
            if "dtype" in config:  # transformers 5's name for it
                config["dtype"] = self.options.dtype
        side_files, notes = choose_side_files(self.base, adapters, config, self.files)
        return MergePlan(self.base, adapters, self.options, shards, config, self.files, side_files,
                         [*self.notes, *notes])

    def _check_targets(self) -> None:
        """Every replacement and every operation names a base tensor (or the tied output embedding)."""
        for name, info in self.sources.items():
            if name not in self.base.tensors and name != self.head_name:
                raise InputError(f"{info.file}: tensor {info.name!r} replaces {name!r}, which the base model "
                                 f"does not have", file=info.file, tensor=info.name, input=info.input)
        for name, ops in self.ops.items():
            if name not in self.base.tensors and name != self.head_name:
                raise InputError(f"{type(ops[0]).__name__} target {name!r} is not a tensor of the base model",
                                 tensor=name, input=ops[0].adapter)

    def _untied_head(self, embed: TensorContent | None) -> TensorContent | None:
        """A separate output embedding when adapters make the tied pair differ; None keeps them tied."""
        if not self.tied or embed is None:
            return None
        name = self.head_name or "lm_head.weight"
        head_ops = tuple(self.ops.get(name, ()))
        token_ops = tuple(op for op in embed.ops if isinstance(op, TokenRowsOp))
        embed_lora = len(embed.ops) > len(token_ops)  # trainable tokens apply to both sides of a tied pair
        head_source = self.sources.get(name)
        head_replaced = head_source is not None and not same_bytes(head_source, embed.source, self.files)
        if not (embed_lora or head_ops or head_replaced):
            return None
        self.notes.append(
            f"tie_word_embeddings: the adapters change {embed.name} and {name} differently, so the output is "
            f"untied: {name} is written separately and config.json says tie_word_embeddings=false"
        )
        return TensorContent(name, head_source or embed.source, token_ops + head_ops, replaced=True)

    def _check_vocab(self, contents: list[TensorContent], config: dict[str, Any]) -> None:
        """A saved, resized embedding changes the vocabulary: every vocabulary-sized tensor must agree."""
        base = self.base.tensors
        resized = [c for c in contents if c.replaced and c.name in base and c.shape != base[c.name].shape]
        for content in resized:
            base_shape, source = base[content.name].shape, content.source
            if len(base_shape) != 2 or content.shape[1:] != base_shape[1:]:
                raise InputError(f"{source.file}: tensor {source.name!r} has shape {list(content.shape)}, "
                                 f"the base's {content.name!r} has {list(base_shape)}",
                                 file=source.file, tensor=source.name, input=source.input)
        if not resized:
            return
        vocab = {content.shape[0] for content in resized}
        for content in contents:
            is_embedding = content.name == self.input_embedding or _is_output_embedding(content.name)
            if (is_embedding or content in resized) and (len(vocab) > 1 or content.shape[0] not in vocab):
                culprit = (content if content in resized else resized[0]).source  # the adapter that resized
                raise InputError(
                    f"the adapters resize the vocabulary to {sorted(vocab)} rows but {content.name!r} has "
                    f"{content.shape[0]}; merge onto the resized base model, or save that tensor with the adapter",
                    tensor=content.name, input=culprit.input,
                )
        config["vocab_size"] = vocab.pop()
        self.notes.append(f"vocab_size: {config['vocab_size']}, from an embedding saved with the adapter")

    def _base_info(self, name: str) -> TensorInfo:
        """The base tensor an output stems from: its own, or for an untied head the shared embedding."""
        return self.base.tensors.get(name) or self.base.tensors[self.input_embedding or ""]

    def _output_dtype(self, content: TensorContent) -> str:
        base_info = self._base_info(content.name)
        if base_info.dtype not in FLOAT_DTYPES:
            if content.ops:
                raise InputError(f"tensor {content.name!r} is {base_info.dtype}; adapters can only change float "
                                 f"tensors", tensor=content.name, input=content.ops[0].adapter)
            return base_info.dtype
        if self.options.dtype == "auto":
            return base_info.dtype
        return OUTPUT_DTYPE_CODES[self.options.dtype]

    def _shard_names(self, contents: list[TensorContent], dtypes: list[str]) -> list[str]:
        """The base's shard of each tensor, or with max_shard_size a new layout."""
        limit = self.options.max_shard_size
        if limit is None:
            return [self._base_info(content.name).file.name for content in contents]
        sizes = [content.source.numel * DTYPE_SIZES[dtype] for content, dtype in zip(contents, dtypes, strict=True)]
        return _pack(sizes, limit)


def _pack(sizes: list[int], limit: int) -> list[str]:
    """Greedy re-sharding in model order, with Hugging Face's shard names; a tensor over the limit sits alone.

    Returns the shard name of each tensor, given each tensor's size in bytes."""
    numbers: list[int] = []
    group = size = members = 0
    for nbytes in sizes:
        if members and size + nbytes > limit:
            group, size, members = group + 1, 0, 0
        numbers.append(group)
        size, members = size + nbytes, members + 1
    count = group + 1
    return [SINGLE_FILE if count == 1 else f"model-{number + 1:05d}-of-{count:05d}.safetensors" for number in numbers]


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
