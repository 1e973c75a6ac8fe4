"""`python -m tools.hash_floor FILE...`: the floor issue #12 sets for a merge, as one command to time.

It imports torch (the start-up every merge in Python pays) and then computes the sha256 of each file with
`hashlib` on one core, as a merge must for its manifest: given the base's shards, which are as many bytes
as a merge's output shards, that is what a merge costs if reading, computing and writing were free.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch  # noqa: F401  (the import is what is measured)

from adapter_merge.worker.engine.checksums import sha256_file


def main(argv: list[str]) -> int:
    for name in argv:
        print(sha256_file(Path(name)), name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
