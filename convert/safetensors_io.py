"""Safetensors checkpoints on disk: list and read them lazily, write them one tensor at a time.

Every file is opened and validated with `safetensors.safe_open` (numpy framework; ``ml_dtypes`` is
imported first so bf16 is understood), which lists names, shapes and dtypes from the header. The
tensor bytes are then read with plain positional reads into a fresh array, one tensor at a time:
``safe_open`` memory-maps the file, and every page a read touches stays in the process's resident
set until the file is closed, so a 5 GB shard would add up to 5 GB to the peak (see
BENCHMARKS.md, "Conversion memory"). Writing uses the format directly — an 8-byte little-endian
header length, a JSON header, then the raw bytes — because the header follows from shapes alone,
so a shard is written tensor by tensor and never buffered whole.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy before safetensors reads it)
import numpy as np
from safetensors import SafetensorError, safe_open

from convert.names import ConversionError
from sharding.sizes import SizeError, parse_size

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype codes for the float types a Llama checkpoint holds.
DTYPE_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives and what it is, read from a safetensors header."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # numpy-style name, e.g. "bfloat16"
    offset: int  # byte offset of the data in the file
    nbytes: int


def shard_bytes(text: str | int) -> int:
    """The ``max_shard_size`` in bytes (`sharding.sizes.parse_size`: ``"5GB"``, ``"2GiB"``, ``"2G"``, an int)."""
    try:
        value = parse_size(text, "the shard size")
    except SizeError as exc:
        raise ConversionError(f"cannot read the size {text!r}: write it like 5GB, 500MB, 2GiB or 2G.") from exc
    if value <= 0:
        raise ConversionError(f"the shard size must be positive, got {text!r}.")
    return value


def _open(file: Path):
    """`safe_open` with its errors turned into one sentence naming the file."""
    try:
        return safe_open(str(file), framework="np")
    except FileNotFoundError as exc:
        raise ConversionError(f"{file} is missing: the checkpoint is incomplete, copy or download it again.") from exc
    except (SafetensorError, OSError) as exc:
        raise ConversionError(
            f"{file} is not a readable safetensors file ({exc}): it is truncated or corrupt, copy or download it again."
        ) from exc


def _files(model_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConversionError(
                f"{index} is not a valid safetensors index (it needs a 'weight_map' object): fix or replace it."
            ) from exc
        return [model_dir / f for f in sorted(set(weight_map.values()))], weight_map
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE], None
    raise ConversionError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}: point at a Hugging Face model directory "
        "saved with safetensors (save_pretrained(..., safe_serialization=True))."
    )


def list_tensors(model_dir: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a single-file or sharded HF checkpoint, from the headers only (no data read)."""
    model_dir = Path(model_dir)
    files, weight_map = _files(model_dir)
    infos: dict[str, TensorInfo] = {}
    for file in files:
        with _open(file) as f:  # validates the header against the file size before we trust it
            start, offsets = _data_offsets(file)
            for name in f.keys():
                piece = f.get_slice(name)
                code = piece.get_dtype()
                if code not in CODE_DTYPES:
                    raise ConversionError(
                        f"tensor {name} in {file.name} is stored as {code}: only float checkpoints "
                        "(F32, BF16, F16) can be converted; dequantize it first."
                    )
                if name in infos:
                    raise ConversionError(f"tensor {name} appears in both {infos[name].file.name} and {file.name}.")
                begin, end = offsets[name]
                infos[name] = TensorInfo(
                    name, file, tuple(piece.get_shape()), CODE_DTYPES[code], start + begin, end - begin
                )
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in infos or infos[name].file.name != fname:
                raise ConversionError(
                    f"{INDEX_FILE} maps {name} to {fname} but that file does not hold it: "
                    "the index and the shards disagree."
                )
    return infos


def _data_offsets(file: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """Start of the data section and each tensor's ``[begin, end)`` within it, from the raw header."""
    with open(file, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return 8 + length, {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}


def _read_into(fh, info: TensorInfo, buffer: memoryview, offset: int) -> None:
    fh.seek(info.offset + offset)
    if fh.readinto(buffer) != len(buffer):
        raise ConversionError(
            f"{info.file} ended inside tensor {info.name}: it is truncated, copy or download it again."
        )


def read_tensors(infos: Iterable[TensorInfo]) -> Iterator[tuple[TensorInfo, np.ndarray]]:
    """Yield ``(info, array)`` one tensor at a time, each file opened once, without memory-mapping."""
    by_file: dict[Path, list[TensorInfo]] = {}
    for info in infos:
        by_file.setdefault(info.file, []).append(info)
    for file, group in by_file.items():
        with open(file, "rb") as fh:
            for info in sorted(group, key=lambda i: i.offset):  # sequential reads
                array = np.empty(info.shape, info.dtype)
                _read_into(fh, info, memoryview(array.reshape(-1).view(np.uint8)), 0)
                yield info, array


def arrays_equal(a: TensorInfo, b: TensorInfo, block: int = 1 << 26) -> bool:
    """Whether two stored tensors are bit-for-bit equal, compared 64 MiB at a time."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    x, y = memoryview(bytearray(block)), memoryview(bytearray(block))
    with open(a.file, "rb") as fa, open(b.file, "rb") as fb:
        for start in range(0, a.nbytes, block):
            n = min(block, a.nbytes - start)
            _read_into(fa, a, x[:n], start)
            _read_into(fb, b, y[:n], start)
            if x[:n] != y[:n]:
                return False
    return True


# ------------------------------------------------------------------------------------ writing
@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: name, shape and numpy dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """HF file names: ``model.safetensors`` alone, else ``model-0000k-of-0000N.safetensors``."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def write_safetensors(
    file: Path, specs: list[TensorSpec], arrays: Iterable[np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Write ``arrays`` (one per spec, in order, produced lazily) as one safetensors file."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_CODES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(file, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for spec, array in zip(specs, arrays, strict=True):
            if tuple(array.shape) != spec.shape or array.dtype != np.dtype(spec.dtype):
                raise ConversionError(
                    f"tensor {spec.name} came out as {array.dtype}{list(array.shape)}, "
                    f"expected {spec.dtype}{list(spec.shape)}."
                )
            # Raw little-endian bytes; a uint8 view avoids the copy `tobytes` would make.
            fh.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
        if fh.tell() != 8 + len(raw) + offset:
            raise ConversionError(f"wrote {fh.tell()} bytes to {file.name}, expected {8 + len(raw) + offset}.")
