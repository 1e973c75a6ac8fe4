"""The folder where the processes of one `adapter-merge serve` or `worker` keep their Prometheus metrics.

Merges run in processes that come and go (Celery pool processes, the embedded worker's per-job processes),
so prometheus_client runs in multiprocess mode: every process writes its samples to files in one folder and
the long-lived process serves the sum. The folder must be set before prometheus_client is first imported,
must be empty when the tree starts, and must not be shared with another tree, so each `serve`/`worker`
gets a fresh one of its own, on local disk (never the shared data dir): `<PROMETHEUS_MULTIPROC_DIR or the
temp dir>/adapter-merge-<kind>-<pid>`, removed at exit; folders that killed trees left behind are removed at
the next start.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "adapter-merge-"


def use_metrics_dir(kind: str) -> Path:
    """Create this process tree's folder, point `PROMETHEUS_MULTIPROC_DIR` at it for this process and every
    child, and remove it when this process exits."""
    parent = Path(os.environ.get(VARIABLE) or tempfile.gettempdir())
    _remove_orphans(parent)
    folder = parent / f"{PREFIX}{kind}-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o700, parents=True)
    os.environ[VARIABLE] = str(folder)
    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, ignore_errors=True))
    return folder


def _remove_orphans(parent: Path) -> None:
    """Folders of trees whose process is gone (killed: no exit handler ran)."""
    for folder in parent.glob(f"{PREFIX}*-*"):
        pid = folder.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
