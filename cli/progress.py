"""The command line's progress bar: tqdm over a phase's bytes, with rate and ETA, on stderr.

Shared by `merge` (one phase, the local merge) and `submit --wait` (a bar per phase of the job: downloading,
merging, publishing). tqdm has no dependencies of its own and comes with huggingface_hub already.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


class PhaseBars:
    """A bar for the current phase; a new phase closes the last bar and opens its own."""

    def __init__(self, only_on_terminal: bool) -> None:
        self.disable = None if only_on_terminal else False
        """tqdm's `disable=None` turns the bar off when stderr is not a terminal."""
        self.bar: tqdm | None = None
        self.phase: str | None = None

    def show(self, phase: str, done: int, total: int) -> None:
        if phase != self.phase or self.bar is None:
            self.close()
            self.phase = phase
            self.bar = tqdm(total=total, initial=done, desc=phase, unit="B", unit_scale=True, unit_divisor=1024,
                            file=sys.stderr, dynamic_ncols=True, disable=self.disable)
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
