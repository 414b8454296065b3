"""The work folder of a benchmark that trains: ``--work DIR`` as given (created and kept, its generated data
reused by a rerun), else a fresh temporary folder removed at the end, so a default rerun never picks up data,
checkpoints or runs that an earlier invocation (or an older data generator) left behind, and two default
runs never share one folder."""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterator, Optional

WORK_HELP = ("work folder, kept and reused by a rerun (default: a fresh temporary one, removed at the end: a "
             "rerun never reuses an earlier run's data or state)")


@contextlib.contextmanager
def work_folder(work: Optional[str], prefix: str) -> Iterator[Path]:
    """``work`` as a created, kept folder; with None, a fresh temporary folder named ``prefix*``, removed
    when the block ends."""
    if work:
        path = Path(work)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)
