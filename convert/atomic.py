"""The one atomic-write helper: a whole output file or directory, or nothing.

Everything is staged beside its destination (same filesystem, so the final rename is atomic on
POSIX) and renamed into place only when the writing finished; on any exception the staged copy
is removed, so a failure leaves neither a half-written destination nor a stray sibling behind.

    with atomic_file("run/report.json") as fh:         # a file
        json.dump(data, fh)
    with atomic_path("out/heatmap.png") as tmp:        # a file some library writes by name
        fig.savefig(tmp)
    with staged_directory("out/hf") as tmp:            # a directory
        (tmp / "config.json").write_text(...)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from convert.names import ConversionError


def check_destination(dst: str | os.PathLike) -> Path:
    """The destination as a `Path`; refuses one that already exists (nothing is ever overwritten)."""
    path = Path(dst).expanduser().absolute()
    if path.exists() or path.is_symlink():
        raise ConversionError(f"destination {path} already exists: choose a new path or remove it first.")
    return path


@contextlib.contextmanager
def staged_directory(dst: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``dst``; on success rename it to ``dst``.

    Args:
        dst: the directory to create.
        replace: an existing ``dst`` is removed just before the rename (an eval's output
            directory, rewritten each run) instead of refused (conversions never overwrite).
    """
    path = Path(dst).expanduser().absolute() if replace else check_destination(dst)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if replace and path.exists():
            shutil.rmtree(path)
        elif not replace:
            check_destination(path)  # someone may have created it while we worked
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``dst`` (same suffix, so writers that infer the format
    from the name, like ``savefig``, still do); on success it replaces ``dst``, on failure it is removed."""
    path = Path(dst).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_file(dst: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """``open(dst, mode)`` that writes all or nothing: an open file on a temporary path, renamed when closed."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_file writes a whole new file: use mode 'w' or 'wb', got {mode!r}.")
    with atomic_path(dst) as tmp, open(tmp, mode, **open_kwargs) as fh:
        yield fh
