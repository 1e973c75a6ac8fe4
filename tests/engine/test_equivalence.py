"""The merged folder, loaded by transformers, computes what the unmerged PEFT model computes.

This checks the meaning of the output rather than its numbers: names, layouts (Conv1D transposes), config
changes (untied lm_head, resized vocab) and every replaced tensor must all be right for logits to agree.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.builders import CASES, Case, model_class
from tests.engine.conftest import Workspace
from tests.oracle import load_peft

# fp32 output vs the unmerged fp32 model: only fp32 summation-order noise remains.
TOLERANCE = {"float32": 2e-5, "bfloat16": 1.5e-2, "float16": 3e-3}


def sample_inputs(case: Case, config: transformers.PretrainedConfig) -> dict[str, torch.Tensor]:
    """A fixed batch for the case's model; token ids cover trainable tokens and any new vocab rows."""
    generator = torch.Generator().manual_seed(0)
    if config.model_type == "vit":
        return {"pixel_values": torch.randn(2, 3, config.image_size, config.image_size, generator=generator)}
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=generator)
    ids[0, :4] = torch.tensor([1, 5, 90 % config.vocab_size, config.vocab_size - 1])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.double()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _reference(workspace: Workspace, case: Case) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits of the unmerged PEFT model in fp32 (adapters applied on the fly), with the inputs used."""
    base_dir, adapters = workspace.inputs(case)
    peft_model, _ = load_peft(base_dir, adapters, torch.float32, vocab_size=case.resized_vocab)
    inputs = sample_inputs(case, peft_model.base_model.model.config)
    return _logits(peft_model, inputs), inputs


def _ours(folder, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    config = transformers.AutoConfig.from_pretrained(folder)
    model = model_class(config).from_pretrained(folder, dtype=torch.float32).eval()
    return _logits(model, inputs)


EQUIVALENCE = [pytest.param(name, "float32", id=f"{name}-float32") for name in CASES] + [
    pytest.param(name, dtype, id=f"{name}-{dtype}")
    for name, dtype in [("llama_lora", "bfloat16"), ("llama_dora", "float16"), ("gpt2_dora", "float16")]
]


@pytest.mark.parametrize(("case_name", "dtype"), EQUIVALENCE)
def test_merged_model_matches_unmerged_peft(workspace: Workspace, case_name: str, dtype: str) -> None:
    case = CASES[case_name]
    want, inputs = _reference(workspace, case)
    got = _ours(workspace.merged(case, dtype), inputs)
    assert got.shape == want.shape
    error = _relative(got, want)
    assert error <= TOLERANCE[dtype], f"logits rel. error {error:.2e} > {TOLERANCE[dtype]}"


def test_tied_lm_head_case_needs_untying(workspace: Workspace) -> None:
    """PEFT's own merge of a LoRA on a tied lm_head changes the embeddings too, so its logits differ from
    the unmerged model; ours must not (covered above). This proves the case can tell the two apart."""
    case = CASES["llama_tied_lm_head"]
    want, inputs = _reference(workspace, case)
    base_dir, adapters = workspace.inputs(case)
    peft_model, names = load_peft(base_dir, adapters, torch.float32)
    naive = _logits(peft_model.base_model.merge_and_unload(adapter_names=names), inputs)
    assert _relative(naive, want) > 100 * TOLERANCE["float32"]
    assert _relative(_ours(workspace.merged(case, "float32"), inputs), want) <= TOLERANCE["float32"]
