"""Errors raised by the video package."""
from __future__ import annotations

import os


class VideoDecodeError(RuntimeError):
    """A video file could not be opened or decoded.

    ``path`` names the file and ``reason`` says why (no video stream, truncated,
    timed out, ...). Batch jobs catch it, count the file and go on.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot decode video {self.path!r}: {reason}")

    def __reduce__(self):  # keeps (path, reason) across process boundaries
        return (type(self), (self.path, self.reason))
