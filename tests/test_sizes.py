"""The one size parser accepts everything both old parsers did (convert's shard size, the planner's --device-memory)."""

import pytest

from convert.names import ConversionError
from convert.safetensors_io import shard_bytes
from sharding.cli import UsageError, parse_bytes
from sharding.sizes import SizeError, has_unit, parse_size

CASES = [
    # what convert's shard size took
    ("5GB", 5 * 10**9),
    ("500MB", 500 * 10**6),
    ("40KB", 40_000),
    ("2GiB", 2 * 2**30),
    ("1TiB", 2**40),
    ("0.5GB", 500_000_000),
    ("5gb", 5 * 10**9),
    (" 5 GB ", 5 * 10**9),
    ("123B", 123),
    ("4096", 4096),
    (4096, 4096),
    # what the planner's --device-memory took
    ("80G", 80 * 2**30),
    ("80g", 80 * 2**30),
    ("16M", 16 * 2**20),
    ("1.5e9", 1_500_000_000),
    ("96e9", 96 * 10**9),
    (".5GiB", 2**29),
    ("80GB", 80 * 10**9),
]


@pytest.mark.parametrize("text, expected", CASES)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "5 XB", "5GBs", "-5GB", "five", "5..0GB", True])
def test_bad_sizes_name_the_field(text):
    with pytest.raises(SizeError, match="--max-shard-size .* is not a size: write e.g. 5GB"):
        parse_size(text, "--max-shard-size")


def test_has_unit():
    assert has_unit("80G") and has_unit("5 gb")
    assert not has_unit("96e9") and not has_unit(7)


def test_callers_keep_their_own_rules():
    assert shard_bytes("80G") == 80 * 2**30  # newly accepted by convert
    with pytest.raises(ConversionError, match="must be positive"):
        shard_bytes("0GB")
    with pytest.raises(ConversionError, match="cannot read the size"):
        shard_bytes("5 parsecs")
    assert parse_bytes("2.5e8") == 250_000_000
    with pytest.raises(UsageError, match="under 1 MiB"):
        parse_bytes("80")
    with pytest.raises(UsageError, match="--device-memory"):
        parse_bytes("eighty")
