"""The merge engine: PEFT LoRA/DoRA adapters streamed into a safetensors base model.

The public surface is two calls:
- `plan_merge(base, adapters, options)` reads headers and configs, checks that everything fits and returns
  the plan; it writes nothing and does not import torch, so the API can use it for preflight. It reads no
  tensor data, except that an adapter's saved output embedding for a tied pair is compared byte for byte
  with the input embedding (to know whether the output can stay tied).
- `merge(base, adapters, out, options, progress=..., should_stop=...)` runs the plan and returns a report.

Errors are `MergeError`s whose attributes (`file`, `tensor`, `option`, `input`, `fault`) say what is at fault;
see `errors`.
"""

import gc
import sys
from typing import Any

from adapter_merge.worker.engine.errors import (
    InputError,
    MergeCancelled,
    MergeError,
    NumericError,
    OutputExistsError,
    StorageError,
    UnsupportedOptionError,
)
from adapter_merge.worker.engine.plan import MergePlan, plan_merge
from adapter_merge.worker.engine.spec import AdapterSpec, MergeOptions, MergeReport, Progress, parse_size

__all__ = [
    "AdapterSpec",
    "InputError",
    "MergeCancelled",
    "MergeError",
    "MergeOptions",
    "MergePlan",
    "MergeReport",
    "NumericError",
    "OutputExistsError",
    "Progress",
    "StorageError",
    "UnsupportedOptionError",
    "merge",
    "parse_size",
    "plan_merge",
]


def __getattr__(name: str) -> Any:
    # `merge` needs torch; importing it lazily keeps `plan_merge` usable where torch is not installed.
    if name == "merge":
        return _import_merge()
    raise AttributeError(name)


def _import_merge() -> Any:
    """The merge function, importing torch with the garbage collector off, then frozen out of its reach.

    Importing torch creates some 250k long-lived objects and no garbage. Collected as usual, the import scans
    them again and again; after it, the next collections and the one at interpreter exit scan them all again:
    0.45 s of a 4 s CLI merge of the 1.1B model (0.1 s at the first collection, 0.35 s at exit), none of it
    finding anything. `gc.freeze` moves them (with whatever the process held before) out of every later
    collection, once, the first time torch is imported here."""
    first = "adapter_merge.worker.engine.pipeline" not in sys.modules
    collecting = gc.isenabled()
    gc.disable()
    try:
        from adapter_merge.worker.engine.pipeline import merge
    finally:
        if first:
            gc.freeze()
        if collecting:
            gc.enable()
    return merge
