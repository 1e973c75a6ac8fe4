"""Everything in the output folder besides the tensors: config.json, the shard index, and the base's small
files (tokenizer, generation config, ...), with an adapter's tokenizer preferred when it resized the vocab."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from adapter_merge.worker.engine.base_model import INDEX_FILE
from adapter_merge.worker.engine.plan import MergePlan

MANIFEST_FILE = "merge_manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".ckpt")
NOT_COPIED = frozenset({"config.json", INDEX_FILE, MANIFEST_FILE})
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
})


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_side_files(plan: MergePlan, folder: Path) -> list[str]:
    """Write config, index and copies; returns notes about what was chosen."""
    notes = []
    write_json(folder / "config.json", plan.config)
    if plan.index_needed:
        write_json(folder / INDEX_FILE, {
            "metadata": {"total_size": plan.bytes_total},
            "weight_map": {tensor.name: tensor.shard for tensor in plan.outputs},
        })
    for source in sorted(plan.base.root.iterdir()):
        if source.is_file() and source.name not in NOT_COPIED and not source.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(source, folder / source.name)
    if "vocab_size" in plan.config and plan.config["vocab_size"] != plan.base.config.get("vocab_size"):
        for adapter in plan.adapters:
            tokenizer = sorted(p for p in adapter.root.iterdir() if p.name in TOKENIZER_FILES and p.is_file())
            for source in tokenizer:
                shutil.copy2(source, folder / source.name)
            if tokenizer:
                notes.append(f"tokenizer files taken from {adapter.label}, whose saved embedding resized the vocab")
    return notes
