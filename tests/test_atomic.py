"""The one atomic-write helper: a whole file or directory appears, or nothing does (and nothing is left beside it)."""

import json
import os

import pytest

from convert.atomic import atomic_file, atomic_path, staged_directory
from convert.names import ConversionError


class Boom(Exception):
    pass


def test_atomic_file_writes_and_replaces(tmp_path):
    path = tmp_path / "sub" / "report.json"
    with atomic_file(path) as fh:
        json.dump({"a": 1}, fh)
        assert not path.exists()  # nothing at the destination until the write finished
    assert json.loads(path.read_text()) == {"a": 1}
    with atomic_file(path, "wb") as fh:
        fh.write(b"[2]")
    assert path.read_bytes() == b"[2]"
    assert sorted(os.listdir(path.parent)) == ["report.json"]


def test_atomic_file_failure_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")
    with pytest.raises(Boom), atomic_file(path) as fh:
        fh.write("half a reco")
        raise Boom
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
    with pytest.raises(ValueError, match="mode 'w'"), atomic_file(path, "a"):
        pass


def test_atomic_path_keeps_the_suffix_for_writers_that_read_it(tmp_path):
    path = tmp_path / "plot.png"
    with atomic_path(path) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp != path
        tmp.write_bytes(b"png")
    assert path.read_bytes() == b"png"
    with pytest.raises(Boom), atomic_path(tmp_path / "other.png") as tmp:
        tmp.write_bytes(b"half")
        raise Boom
    assert os.listdir(tmp_path) == ["plot.png"]


def test_staged_directory_all_or_nothing(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(Boom), staged_directory(dst) as tmp:
        (tmp / "a.txt").write_text("x")
        raise Boom
    assert os.listdir(tmp_path) == []
    with staged_directory(dst) as tmp:
        (tmp / "a.txt").write_text("x")
        assert not dst.exists()
    assert (dst / "a.txt").read_text() == "x"
    # Conversions never overwrite; eval outputs are replaced whole.
    with pytest.raises(ConversionError, match="already exists"), staged_directory(dst):
        pass
    with staged_directory(dst, replace=True) as tmp:
        (tmp / "b.txt").write_text("y")
    assert os.listdir(dst) == ["b.txt"]
    with pytest.raises(Boom), staged_directory(dst, replace=True) as tmp:
        (tmp / "c.txt").write_text("z")
        raise Boom
    assert os.listdir(dst) == ["b.txt"]  # a failed rewrite keeps the previous results
    assert os.listdir(tmp_path) == ["out"]
