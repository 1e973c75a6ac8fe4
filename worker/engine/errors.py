"""Errors the engine raises. Every message names the file, tensor or option at fault.

The split matters to callers: an `InputError` is the requester's fault (a 4xx at the API, found before any
output is written); a `NumericError` is found while merging, in data the requester supplied; `MergeCancelled`
is not an error at all, just a stop that was asked for.
"""


class MergeError(Exception):
    """Base of everything the engine raises on purpose."""


class InputError(MergeError):
    """A base model, adapter or option that cannot be merged as given."""


class UnsupportedOptionError(InputError):
    """An adapter option the engine refuses rather than merge wrongly."""


class NumericError(MergeError):
    """A merged or input tensor that is not finite, or does not fit the output dtype."""


class MergeCancelled(MergeError):
    """The caller asked the merge to stop; its partial output has been removed."""
