"""Write a whole output directory or nothing: stage it beside the destination, rename at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from convert.names import ConversionError


def check_destination(dst: str | os.PathLike) -> Path:
    """The destination as a `Path`; refuses one that already exists (nothing is ever overwritten)."""
    path = Path(dst).expanduser().absolute()
    if path.exists() or path.is_symlink():
        raise ConversionError(f"destination {path} already exists: choose a new path or remove it first.")
    return path


@contextlib.contextmanager
def staged_directory(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``dst``; on success rename it to ``dst``.

    The temporary directory lives in the destination's parent so the final rename stays on one
    filesystem (atomic on POSIX). On any exception it is removed, so a failed conversion leaves
    neither ``dst`` nor a half-written sibling behind.
    """
    path = check_destination(dst)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        check_destination(path)  # someone may have created it while we worked
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
