"""The benchmark's baseline: what a PEFT user runs to merge an adapter on CPU.

`python -m tools.peft_merge BASE ADAPTER OUT` loads the base in bf16 with transformers, applies the adapter
with PEFT, `merge_and_unload()`s it and `save_pretrained()`s the result. It runs in its own process so the
benchmark can measure its wall time and peak memory like any other command.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def peft_merge(base: Path, adapter: Path, out: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.peft_merge", description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("adapter", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    peft_merge(args.base, args.adapter, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
