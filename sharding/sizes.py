"""The one byte-size parser, for every flag and config field that takes a size ("5GB", "80GiB", "80G", "96e9").

Decimal units are powers of 10 (``KB``, ``MB``, ``GB``, ``TB``), binary ones powers of 2
(``KiB`` … ``TiB``, and the bare letters ``K``, ``M``, ``G``, ``T`` as in ``--device-memory 80G``);
case does not matter; a bare number is bytes. It lives in `sharding` (memory planning) so that
every package that takes a size — sharding's planner CLI, convert's shard size — can import it.
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40})
_SIZE = re.compile(r"\s*((?:\d+\.?\d*|\.\d+)(?:[eE][+]?\d+)?)\s*([a-zA-Z]*)\s*")


class SizeError(ValueError):
    """Text that is not a byte size; the message says how to write one."""


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes in ``text``: ``"5GB"`` → 5·10⁹, ``"2GiB"`` / ``"2G"`` → 2·2³⁰, ``"1.5e9"`` → 1.5·10⁹, ``7`` → 7.

    Args:
        text: a size string or a plain int (bytes).
        what: the flag or field it came from, for the error message.

    Returns:
        A non-negative int (callers that need a positive size or a minimum check it).

    Raises:
        SizeError: ``text`` is not a size (one sentence naming ``what`` and how to write it).
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.fullmatch(str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise SizeError(f"{what} {text!r} is not a size: write e.g. 5GB, 500MB, 2GiB, 80G or 96e9.")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 0:
        raise SizeError(f"{what} {text!r} is negative: give a size of at least 0 bytes.")
    return value


def has_unit(text: str | int) -> bool:
    """Whether a size string names its unit (``"80G"``: yes; ``"96e9"``, ``7``: no)."""
    m = _SIZE.fullmatch(str(text))
    return bool(m and m.group(2))
