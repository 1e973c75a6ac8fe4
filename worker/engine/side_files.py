"""Everything in the output folder besides the tensors: config.json, the shard index, and the base's small
files (tokenizer, generation config, ...), with an adapter's tokenizer preferred when it resized the vocab.

Which files are copied is decided while planning, where each is checked (`InputFiles`); the copy then reads
from a descriptor opened and checked again, never by path, so a file swapped in between cannot leak.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapter_merge.worker.engine.base_model import INDEX_FILE, BaseModel
from adapter_merge.worker.engine.errors import InputRef
from adapter_merge.worker.engine.input_files import InputFiles, unreadable

if TYPE_CHECKING:
    from adapter_merge.worker.engine.adapter import Adapter

MANIFEST_FILE = "merge_manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".ckpt")
NOT_COPIED = frozenset({"config.json", INDEX_FILE, MANIFEST_FILE})
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
})
COPY_CHUNK_BYTES = 1024 * 1024


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def choose_side_files(base: BaseModel, adapters: Sequence[Adapter], config: dict[str, Any],
                      files: InputFiles) -> tuple[dict[str, tuple[Path, InputRef]], list[str]]:
    """Output name -> (input file, its input) of every copied file, each checked; and notes on the choice."""
    chosen: dict[str, tuple[Path, InputRef]] = {
        source.name: (source, "base") for source in base.files
        if source.name not in NOT_COPIED and not source.name.endswith(WEIGHT_SUFFIXES)
    }  # base.files are checked already
    notes = []
    if "vocab_size" in config and config["vocab_size"] != base.config.get("vocab_size"):
        for adapter in adapters:
            tokenizer = sorted(p for p in adapter.root.iterdir() if p.name in TOKENIZER_FILES and p.is_file())
            for source in tokenizer:
                files.check(source, adapter.index)
                chosen[source.name] = (source, adapter.index)
            if tokenizer:
                notes.append(f"tokenizer files taken from {adapter.label}, whose saved embedding resized the vocab")
    return chosen, notes


def write_side_files(folder: Path, config: dict[str, Any], index: dict[str, Any] | None,
                     copies: dict[str, tuple[Path, InputRef]], files: InputFiles) -> None:
    """Write config, the shard index (if any) and the copies chosen by `choose_side_files` (OS errors while
    writing are the caller's to turn into StorageError)."""
    write_json(folder / "config.json", config)
    if index is not None:
        write_json(folder / INDEX_FILE, index)
    for name, (source, input) in sorted(copies.items()):
        _copy(files, source, input, folder / name)


def _copy(files: InputFiles, source: Path, input: InputRef, target: Path) -> None:
    """Copy bytes and times from the checked open file; a read failure is the input's, a write the machine's."""
    with files.open(source, input) as reader, target.open("wb") as writer:
        while True:
            try:
                chunk = reader.read(COPY_CHUNK_BYTES)
            except OSError as error:
                raise unreadable(source, input, error) from error
            if not chunk:
                break
            writer.write(chunk)
        stat = os.fstat(reader.fileno())
        writer.flush()
        os.utime(writer.fileno(), ns=(stat.st_atime_ns, stat.st_mtime_ns))
