"""Durable writes shared by the runner's checkpoints and the top-k files of ``fastkd.offline``."""

from __future__ import annotations

import os


def fsync_directory(directory: str) -> None:
    """``fsync`` a directory, so that a rename into it survives a crash (a no-op on Windows, where
    directories cannot be opened for it)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
