"""`python -m tools.hash_floor FILE...`: the floor issue #12 sets for a merge, as one command to time.

It imports torch (the start-up every merge in Python pays) and then computes the sha256 of each file with
`hashlib` on one core, as a merge must for its manifest: given the base's shards, which are as many bytes
as a merge's output shards, that is what a merge costs if reading, computing and writing were free.

Torch is imported the way the engine imports it, with the garbage collector kept off its objects (see
`adapter_merge.worker.engine`): a plain `import torch` also pays ~0.45 s of collections (at the first one and
at exit) that a merge does not, and the floor is what a merge cannot skip.
"""

from __future__ import annotations

import sys
from pathlib import Path

from adapter_merge.worker import engine
from adapter_merge.worker.engine.checksums import sha256_file


def main(argv: list[str]) -> int:
    engine.merge  # noqa: B018  (imports torch: the start-up is what is measured)
    for name in argv:
        print(sha256_file(Path(name)), name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
