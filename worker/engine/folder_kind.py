"""Telling a base model folder from an adapter folder by its marker file, before anything is parsed.

A base and an adapter given the wrong way round, or a file given for a folder, should read as such, not as
"config.json not found". The service's reference checks (`core.refs`) word their refusals with the same
function, so the command line and the API say the same thing.
"""

from __future__ import annotations

from pathlib import Path

from adapter_merge.worker.engine.errors import InputError, InputRef

BASE_MARKER = "config.json"
ADAPTER_MARKER = "adapter_config.json"


def wrong_kind(folder: Path, adapter: bool) -> str | None:
    """Why `folder` is not the kind of model folder wanted, as a phrase that follows its name ("is not a base
    model: ..."), or None when it has the marker file of that kind."""
    marker, other = (ADAPTER_MARKER, BASE_MARKER) if adapter else (BASE_MARKER, ADAPTER_MARKER)
    if (folder / marker).is_file():
        return None
    kind, other_kind = ("a PEFT adapter", "a base model") if adapter else ("a base model", "an adapter")
    hint = f" (it looks like {other_kind}: it has {other})" if (folder / other).is_file() else ""
    return f"is not {kind}: it has no {marker}{hint}"


def require_model_folder(folder: Path, input: InputRef) -> None:
    """Refuse a path that is missing, a file, or a folder of the other kind, naming it; `input` "base" or an
    adapter's index says which kind is wanted."""
    what = "base model" if input == "base" else "adapter"
    if not folder.exists():
        raise InputError(f"{folder}: {what} folder not found", file=folder, input=input)
    if not folder.is_dir():
        raise InputError(f"{folder}: is a file, not a folder; give the {what} folder", file=folder, input=input)
    if problem := wrong_kind(folder, adapter=input != "base"):
        marker = BASE_MARKER if input == "base" else ADAPTER_MARKER
        raise InputError(f"{folder}: {problem}", file=folder / marker, input=input)
