"""Which files of a base model folder, besides its tensors, go into the merged output, and which do not and why.

Copied, at their relative paths: every file that is not weights, at any depth (`1_Pooling/config.json`,
tokenizer folders, `generation_config.json`, `README.md`, `.gitattributes`).

Not copied, each listed in the manifest with its reason:
- weights in any format, wherever they lie (`pytorch_model.bin`, `tf_model.h5`, `model.onnx`, a stale
  `model.safetensors` beside an index, ...): they hold the unmerged model, and a loader that prefers them
  would silently undo the merge; pickles are never handed on either. The exception is a sentence-transformers
  module folder named by `modules.json` (a `2_Dense` layer): no adapter changes it and the model cannot load
  without it.
- export folders at the top (`onnx/`, `openvino/`, `coreml/`, Meta's `original/`): the unmerged model in
  another runtime's format, whose other files make no sense without its weights.
- hidden folders (`.git`, `.cache`, `.ipynb_checkpoints`): version control and tool caches, not the model.
- anything neither a regular file nor a folder (FIFOs, sockets, devices): reading one could block or never end.
- links to folders: not followed (a loop, or a whole tree from elsewhere).

A link to a file is copied as the file it leads to (the Hugging Face cache is made of such links). With
allowed roots, every link, copied or not, must stay inside them: one leading outside is an error naming it,
as for every input file. The walk is bounded by the limits the service puts on references.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

from adapter_merge.worker.engine.errors import InputError
from adapter_merge.worker.engine.input_files import InputFiles, unreadable
from adapter_merge.worker.engine.safe_json import JsonError, parse_json

MAX_ENTRIES = 10_000
"""Files and folders a model folder may hold (what is walked: skipped folders are not entered)."""
MAX_DEPTH = 3
"""Path components below the model folder (`a/b/c.json` is 3)."""
MANIFEST_FILE = "merge_manifest.json"
MODULES_FILE = "modules.json"
MAX_MODULES_BYTES = 2**20
WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".keras", ".msgpack", ".gguf", ".ggml",
    ".onnx", ".onnx_data", ".ot", ".tflite", ".mlmodel", ".npz", ".npy",
)
EXPORT_FOLDERS = frozenset({"onnx", "openvino", "coreml", "original"})
WEIGHTS_REASON = "weights: they hold the unmerged model, which the merged safetensors replace"
_SPECIAL_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
                  stat.S_IFBLK: "a block device"}


@dataclass(frozen=True)
class Skipped:
    path: str
    """Relative to the model folder."""
    reason: str


@dataclass(frozen=True)
class FolderSurvey:
    copies: tuple[Path, ...]
    """Files to copy, each checked (a regular file inside the allowed roots), in path order."""
    skipped: tuple[Skipped, ...]


def survey_folder(root: Path, handled: frozenset[str], files: InputFiles) -> FolderSurvey:
    """Walk the base folder `root`; `handled` names its top-level files the merge writes anew (config.json,
    the shards and their index), which are neither copied nor skipped."""
    walk = _Walk(root, handled, files)
    walk.visit(root)
    return FolderSurvey(tuple(walk.copies), tuple(walk.skipped))


class _Walk:
    def __init__(self, root: Path, handled: frozenset[str], files: InputFiles) -> None:
        self.root = root
        self.handled = handled
        self.files = files
        self.modules = _module_folders(root, files)
        self.copies: list[Path] = []
        self.skipped: list[Skipped] = []
        self.count = 0

    def visit(self, folder: Path) -> None:
        try:
            entries = sorted(folder.iterdir())
        except OSError as error:
            raise InputError(f"{folder}: cannot list: {error.strerror}", file=folder, input="base") from error
        for entry in entries:
            relative = entry.relative_to(self.root)
            self.count += 1
            if self.count > MAX_ENTRIES:
                raise InputError(f"{self.root}: holds more than {MAX_ENTRIES} files and folders", file=self.root,
                                 input="base")
            if len(relative.parts) > MAX_DEPTH:
                raise InputError(f"{entry}: nested deeper than {MAX_DEPTH} folders in the base model folder",
                                 file=entry, input="base")
            if str(relative) not in self.handled:
                self._sort(entry, relative)

    def _sort(self, entry: Path, relative: Path) -> None:
        """Copy, skip (with the reason) or enter one entry."""
        link = entry.is_symlink()
        if link:
            self.files.check_inside(entry, "base")
        try:
            mode = entry.stat().st_mode
        except OSError as error:
            if not link:
                raise unreadable(entry, "base", error) from error
            self._skip(relative, f"a link that leads nowhere ({error.strerror})")
            return
        top = len(relative.parts) == 1
        if stat.S_ISDIR(mode):
            if link:
                self._skip(relative, "a link to a folder: not followed")
            elif reason := skipped_folder(entry.name, top):
                self._skip(relative, reason)
            else:
                self.visit(entry)
        elif not stat.S_ISREG(mode):
            self._skip(relative, f"{_SPECIAL_KINDS.get(stat.S_IFMT(mode), 'not a regular file')}, not a file")
        elif top and entry.name == MANIFEST_FILE:
            self._skip(relative, "the base's own merge manifest; this merge writes its own")
        elif entry.name.lower().endswith(WEIGHT_SUFFIXES) and relative.parts[0] not in self.modules:
            self._skip(relative, WEIGHTS_REASON)
        else:
            self.files.check(entry, "base")
            self.copies.append(entry)

    def _skip(self, relative: Path, reason: str) -> None:
        self.skipped.append(Skipped(str(relative), reason))


def skipped_folder(name: str, top: bool) -> str | None:
    """Why a sub-folder of the base is not entered (None: it is); the API's check of a local base skips the same
    folders, so a `.git` deeper than the limits does not refuse a base the merge would read."""
    if name.startswith("."):
        return "a hidden folder (version control or a tool's cache), not part of the model"
    if top and name in EXPORT_FOLDERS:
        return "an export of the unmerged model to another runtime"
    return None


def _module_folders(root: Path, files: InputFiles) -> frozenset[str]:
    """Top-level folders of sentence-transformers modules (`modules.json` entries' paths); none when there is
    no such file or it cannot be read as one, so that their weights are then skipped like any others."""
    path = root / MODULES_FILE
    if not path.is_file():
        return frozenset()
    try:
        modules = parse_json(files.read(path, "base", "modules.json", MAX_MODULES_BYTES))
    except JsonError:
        return frozenset()
    if not isinstance(modules, list):
        return frozenset()
    return frozenset(entry["path"] for entry in modules
                     if isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry["path"]
                     and Path(entry["path"]).name == entry["path"] and entry["path"] not in (".", ".."))
