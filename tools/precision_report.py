"""Print the worst error of our merges against the float64 PEFT oracle over every test case.

The precision tests only assert the bars (1 ulp for 16-bit outputs, 1e-5 relative error of the change for
fp32); this prints the figures themselves. Needs the test extras (transformers, PEFT):
`python -m tools.precision_report`.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

from tests.builders import CASES, DTYPES
from tests.engine.conftest import Workspace
from tests.engine.test_precision import _before, _is_untouched
from tests.oracle import change_rel_error, load_dir_tensors, round_once, torch_dtype, ulp_distance


def main() -> None:
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as folder:
        workspace = Workspace(Path(folder))
        worst_ulp, worst_rel, compared = 0, 0.0, 0
        for case in CASES.values():
            for dtype in case.dtypes:
                ours = load_dir_tensors(workspace.merged(case, dtype))
                base = workspace.base_tensors(case)
                out_dtype = torch_dtype(dtype, DTYPES[case.base.dtype])
                for name, exact in workspace.oracle(case).items():
                    compared += 1
                    if out_dtype != torch.float32:
                        worst_ulp = max(worst_ulp, int(ulp_distance(ours[name], round_once(exact, out_dtype)).max()))
                    elif not _is_untouched(base, name, exact):
                        worst_rel = max(worst_rel, change_rel_error(ours[name], exact, _before(base, name, exact)))
    print(f"{len(CASES)} cases, {compared} tensors compared with the float64 PEFT merge rounded once:")
    print(f"  16-bit outputs: worst {worst_ulp} ulp (bar: 1)")
    print(f"  fp32 outputs:   worst relative error of the change {worst_rel:.2e} (bar: 1e-5)")


if __name__ == "__main__":
    main()
