"""Tiny base models and PEFT adapters built locally, so every test has real files without a download.

Every model is a few kilobytes (hidden 16-32, 1-2 layers, vocab <= 128) and every random choice is seeded,
so a case builds the same bytes on every run. Adapters are built with `init_lora_weights=False` and then
perturbed where PEFT would start at a no-op (DoRA magnitude, trainable tokens, modules_to_save, biases),
because a test that merges a zero delta proves nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Files a real checkpoint carries beside the weights; the engine must copy them unchanged.
SIDE_FILES = {
    "tokenizer.json": '{"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}}}\n',
    "tokenizer_config.json": '{"model_max_length": 64}\n',
    "special_tokens_map.json": "{}\n",
}


def _config(arch: str) -> transformers.PretrainedConfig:
    """The tiny config for one architecture; `arch` names the family and the variant (tied or not)."""
    if arch in ("llama", "llama_tied"):
        return transformers.LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=arch == "llama_tied", architectures=["LlamaForCausalLM"],
        )
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=80, n_embd=32, n_layer=2, n_head=4, n_positions=64, architectures=["GPT2LMHeadModel"],
        )
    if arch == "bert":
        return transformers.BertConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            max_position_embeddings=64, num_labels=3, architectures=["BertForSequenceClassification"],
        )
    if arch == "vit":
        return transformers.ViTConfig(
            image_size=8, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=48,
            num_hidden_layers=1, num_attention_heads=4, num_labels=3, architectures=["ViTForImageClassification"],
        )
    raise ValueError(f"unknown arch {arch!r}")


def model_class(config: transformers.PretrainedConfig) -> type[transformers.PreTrainedModel]:
    """The transformers class a checkpoint was saved from (its `architectures` entry)."""
    return getattr(transformers, config.architectures[0])


def _randomize_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Norm weights start at exactly 1.0; make them generic so a copied tensor is not trivially right."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.lower() and param.dim() == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


@dataclass(frozen=True)
class BaseSpec:
    """A base checkpoint: architecture, stored dtype and, for a sharded checkpoint, the shard size."""

    arch: str
    dtype: str = "bfloat16"
    shard_size: str | None = None
    seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.arch}-{self.dtype}-{self.shard_size or 'single'}-{self.seed}"


def build_base(spec: BaseSpec, out_dir: Path) -> Path:
    """Save a randomly initialised tiny model in `spec.dtype` (sharded when `shard_size` is set)."""
    torch.manual_seed(spec.seed)
    config = _config(spec.arch)
    model = model_class(config)(config)
    _randomize_norms(model, torch.Generator().manual_seed(spec.seed + 1))
    model = model.to(DTYPES[spec.dtype]).eval()
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if spec.shard_size:
        kwargs["max_shard_size"] = spec.shard_size
    model.save_pretrained(out_dir, **kwargs)
    for name, text in SIDE_FILES.items():
        (out_dir / name).write_text(text)
    return out_dir


@dataclass(frozen=True)
class AdapterRecipe:
    """How to build one adapter: LoraConfig arguments plus what to do before saving it."""

    name: str
    lora: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    resize_vocab: int | None = None
    """Grow the vocabulary before attaching the adapter (saved with `save_embedding_layers=True`)."""
    save_embedding_layers: bool | str = "auto"
    seed: int = 1


def _perturb(model: PeftModel, generator: torch.Generator) -> None:
    """Move every trainable tensor PEFT initialises to a no-op away from it, with fixed noise."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param.dtype)
            if "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.2 * noise)  # m != ||W + D|| so the DoRA rescale matters
            elif "trainable_tokens_delta" in name or "modules_to_save" in name or name.endswith("bias"):
                param.add_(0.05 * noise)
            elif "lora_embedding" in name:
                param.mul_(0.1)  # PEFT draws these from N(0, 1): keep embeddings at a sane size


def build_adapter(base_dir: Path, recipe: AdapterRecipe, out_dir: Path, *, safe: bool = True) -> Path:
    """Attach a LoRA/DoRA adapter to the base (fp32) with non-zero B, perturb it and save it."""
    torch.manual_seed(recipe.seed)
    config = transformers.AutoConfig.from_pretrained(base_dir)
    model = model_class(config).from_pretrained(base_dir, dtype=torch.float32)
    if recipe.resize_vocab:
        model.resize_token_embeddings(recipe.resize_vocab, mean_resizing=False)
    lora_kwargs = {"init_lora_weights": False, **recipe.lora}
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    _perturb(peft_model, torch.Generator().manual_seed(recipe.seed + 100))
    peft_model.save_pretrained(
        out_dir, safe_serialization=safe, save_embedding_layers=recipe.save_embedding_layers
    )
    if safe:
        _check_non_trivial(out_dir)
    return out_dir


def _check_non_trivial(adapter_dir: Path) -> None:
    """Fail the build, not a test, if an adapter's B matrices are zero (the merge would be a no-op)."""
    with safe_open(adapter_dir / "adapter_model.safetensors", framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
            if "lora_B" in key or "lora_embedding_B" in key:
                assert handle.get_tensor(key).abs().sum() > 0, f"{key} is zero"


def edit_adapter_config(adapter_dir: Path, **changes: Any) -> None:
    """Rewrite fields of adapter_config.json in place (for the bad-input suite)."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))


@dataclass(frozen=True)
class Case:
    """One merge scenario: a base, adapters applied in order with their weights, and expectations."""

    name: str
    base: BaseSpec
    adapters: tuple[AdapterRecipe, ...]
    weights: tuple[float, ...] = ()
    dtypes: tuple[str, ...] = ("auto",)
    untie: bool = False
    """Base has tied embeddings and an adapter changes lm_head: output must be untied."""

    @property
    def adapter_weights(self) -> tuple[float, ...]:
        return self.weights or (1.0,) * len(self.adapters)

    @property
    def resized_vocab(self) -> int | None:
        return next((a.resize_vocab for a in self.adapters if a.resize_vocab), None)


ALL_DTYPES = ("auto", "bfloat16", "float16", "float32")
LLAMA_BF16 = BaseSpec("llama", "bfloat16")

_LORA = AdapterRecipe("lora", {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS})
_DORA = AdapterRecipe("dora", {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS, "use_dora": True}, seed=2)

CASES: dict[str, Case] = {c.name: c for c in [
    Case("llama_lora", LLAMA_BF16, (_LORA,), dtypes=ALL_DTYPES),
    Case("llama_dora", LLAMA_BF16, (_DORA,), dtypes=ALL_DTYPES),
    Case("llama_rslora_patterns", LLAMA_BF16, (AdapterRecipe("rslora_patterns", {
        "r": 4, "lora_alpha": 8.5, "use_rslora": True, "target_modules": LLAMA_TARGETS,
        # Overlapping regexes: the first key in order wins, rank and alpha are looked up separately.
        "rank_pattern": {r"layers\.0\.self_attn\.q_proj": 2, "q_proj": 6, r"layers\.1\.mlp\.\w+_proj": 3},
        "alpha_pattern": {"v_proj": 3.5, r"layers\.0\..*": 12.25},
    }, seed=3),), dtypes=ALL_DTYPES),
    Case("llama_dora_weighted", LLAMA_BF16, (_DORA,), weights=(0.7,), dtypes=("bfloat16", "float32")),
    Case("llama_fp32_lora", BaseSpec("llama", "float32"), (_LORA,), dtypes=("auto", "bfloat16")),
    Case("llama_fp16_dora", BaseSpec("llama", "float16"), (_DORA,), dtypes=("auto", "float32")),
    Case("llama_embedding_lora", LLAMA_BF16, (AdapterRecipe("embedding_lora", {
        "r": 4, "lora_alpha": 4, "target_modules": ["embed_tokens", "lm_head", "q_proj"]}, seed=4),),
        dtypes=("auto", "float32")),
    Case("llama_embedding_dora", LLAMA_BF16, (AdapterRecipe("embedding_dora", {
        "r": 4, "lora_alpha": 4, "target_modules": ["embed_tokens", "v_proj"], "use_dora": True}, seed=5),),
        dtypes=("auto", "float32")),
    Case("llama_trainable_tokens", LLAMA_BF16, (AdapterRecipe("trainable_tokens", {
        "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "trainable_token_indices": [1, 5, 90]}, seed=6),), dtypes=("auto", "float32")),
    Case("llama_resized_vocab", LLAMA_BF16, (AdapterRecipe("resized_vocab", {
        "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        resize_vocab=104, save_embedding_layers=True, seed=7),), dtypes=("auto", "float32")),
    Case("llama_tied_lm_head", BaseSpec("llama_tied", "bfloat16"), (AdapterRecipe("tied_lm_head", {
        "r": 4, "lora_alpha": 8, "target_modules": ["lm_head", "q_proj"]}, seed=8),),
        dtypes=("auto", "float32"), untie=True),
    # Tied bases whose embedding (and so lm_head) changes: the output may stay tied.
    Case("llama_tied_trainable_tokens", BaseSpec("llama_tied", "bfloat16"), (AdapterRecipe(
        "tied_trainable_tokens", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                  "trainable_token_indices": [2, 7]}, seed=17),), dtypes=("auto", "float32")),
    Case("llama_tied_resized_vocab", BaseSpec("llama_tied", "bfloat16"), (AdapterRecipe("tied_resized_vocab", {
        "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        resize_vocab=100, save_embedding_layers=True, seed=18),), dtypes=("auto", "float32")),
    Case("llama_stacked", LLAMA_BF16, (_LORA, _DORA), weights=(1.0, 0.5), dtypes=("auto", "float32")),
    Case("gpt2_lora", BaseSpec("gpt2", "float32"), (AdapterRecipe("gpt2_lora", {
        "r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"],
        "fan_in_fan_out": True}, seed=9),), dtypes=("auto", "bfloat16")),
    Case("gpt2_dora", BaseSpec("gpt2", "float16"), (AdapterRecipe("gpt2_dora", {
        "r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"],
        "fan_in_fan_out": True, "use_dora": True}, seed=10),), dtypes=("auto", "float32")),
    Case("bert_lora_bias", BaseSpec("bert", "bfloat16"), (AdapterRecipe("bert_lora_bias", {
        "r": 4, "lora_alpha": 8, "target_modules": ["query", "value", "dense"], "lora_bias": True}, seed=11),),
        dtypes=("auto", "float32")),
    Case("bert_bias_all", BaseSpec("bert", "bfloat16"), (AdapterRecipe("bert_bias_all", {
        "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "bias": "all"}, seed=12),),
        dtypes=("auto", "float32")),
    Case("bert_cls_head", BaseSpec("bert", "float32"), (AdapterRecipe("bert_cls_head", {
        "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"}, seed=13),),
        dtypes=("auto", "bfloat16")),
    # bias="all" also saves the modules_to_save wrapper's own biases (`classifier.original_module.bias`, ...).
    Case("bert_bias_all_cls_head", BaseSpec("bert", "bfloat16"), (AdapterRecipe("bert_bias_all_cls_head", {
        "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "bias": "all", "task_type": "SEQ_CLS"},
        seed=16),), dtypes=("auto", "float32")),
    # transformers 5 renames ViT's encoder modules in memory but not on disk, so only the conv patch
    # projection (same name in both) is targeted: an adapter's keys must match the checkpoint's.
    Case("vit_conv_lora", BaseSpec("vit", "float32"), (AdapterRecipe("vit_conv_lora", {
        "r": 4, "lora_alpha": 8, "target_modules": ["projection"]}, seed=14),),
        dtypes=("auto", "bfloat16")),
    Case("vit_conv_dora", BaseSpec("vit", "bfloat16"), (AdapterRecipe("vit_conv_dora", {
        "r": 4, "lora_alpha": 8, "target_modules": ["projection"], "use_dora": True}, seed=15),),
        dtypes=("auto", "float32")),
    Case("llama_sharded", BaseSpec("llama", "bfloat16", shard_size="20KB"), (_LORA,),
         dtypes=("auto", "float32")),
]}
