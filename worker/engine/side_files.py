"""Everything in the output folder besides the tensors: config.json, the shard index, and the base's other
files (tokenizer, generation config, sentence-transformers module folders, ...) at their relative paths, with
an adapter's tokenizer preferred when it resized the vocab. What is copied and what is skipped is decided by
`folder_survey`.

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
from adapter_merge.worker.engine.folder_kind import BASE_MARKER
from adapter_merge.worker.engine.input_files import InputFiles, unreadable

if TYPE_CHECKING:
    from adapter_merge.worker.engine.adapter import Adapter

TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
})
COPY_CHUNK_BYTES = 1024 * 1024


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def choose_side_files(base: BaseModel, adapters: Sequence[Adapter], config: dict[str, Any],
                      files: InputFiles) -> tuple[dict[str, tuple[Path, InputRef]], list[str]]:
    """Output path (relative) -> (input file, its input) of every copied file, each checked; and notes on the
    choice."""
    chosen: dict[str, tuple[Path, InputRef]] = {
        str(source.relative_to(base.root)): (source, "base") for source in base.survey.copies
    }  # checked by the survey already
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
                     copies: dict[str, tuple[Path, InputRef]], files: InputFiles) -> list[str]:
    """Write config, the shard index (if any) and the copies chosen by `choose_side_files`; returns the
    relative paths written (OS errors while writing are the caller's to turn into StorageError)."""
    written = [BASE_MARKER, *([INDEX_FILE] if index is not None else []), *sorted(copies)]
    write_json(folder / BASE_MARKER, config)
    if index is not None:
        write_json(folder / INDEX_FILE, index)
    for name, (source, input) in sorted(copies.items()):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        _copy(files, source, input, folder / name)
    return written


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
