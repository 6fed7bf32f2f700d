"""Document sources backed by the ``datasets`` library: local files and hub datasets.

A source hands out its documents by a running index ``m`` (the m-th document this source
contributes to the stream), so the data iterator's state is just a few counters:

- `FileSource` (random access; json/jsonl/parquet/txt files or a non-streaming hub dataset):
  epoch ``e = m // n`` is a fresh permutation of the training documents seeded by
  ``(seed, split, source, e)``; with ``upsample_long = α > 0`` each epoch is instead ``n``
  draws with replacement, document i with probability ∝ (characters_i)^α.
- `StreamSource` (``streaming: true``): documents in stream order, pass after pass; reaching
  an earlier ``m`` (a restore) re-opens the stream and skips forward, which costs a read of
  the stream up to that point.

Held-out documents (``heldout_fraction``) are removed from the training split and are the
whole of the held-out split: for random access a fixed set chosen independently of the
training seed; for streams every document whose stream index hashes below the fraction.
"""

from __future__ import annotations

import os

import numpy as np

from train.data_config import SPLIT_TAGS, DataConfig, DataError, SourceConfig, resolve_files
from train.packing import Doc
from train.synthetic_source import SyntheticSource

# Fixed key for choosing held-out documents, so changing the training seed never leaks them into training.
_HELDOUT_KEY = 0x5EED_0F_D474


def encode_text(text, tokenizer, cfg: DataConfig, where: str) -> Doc:
    """Tokenize one document, wrapped in BOS/EOS as configured."""
    if not isinstance(text, str):
        raise DataError(f"{where} holds a {type(text).__name__}, not text: point text_field at a string column.")
    try:
        ids = tokenizer.encode(text)
    except Exception as exc:
        raise DataError(f"the tokenizer failed on a document of {where}: {exc}.") from exc
    if cfg.add_bos and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id, *ids]
    if cfg.add_eos and tokenizer.eos_id is not None:
        ids = [*ids, tokenizer.eos_id]
    return Doc(np.asarray(ids, np.int32))


def _heldout_hash(index: int, fraction: float) -> bool:
    """Deterministic pseudo-random split of stream indices (a 64-bit multiplicative hash)."""
    h = (index * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (1 << 64)
    h ^= h >> 31
    return (h % (1 << 53)) / float(1 << 53) < fraction


def _root_cause(exc: BaseException) -> str:
    """``Type: message`` of the innermost cause (``datasets`` wraps reader errors in generic ones)."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    return f"{exc.__class__.__name__}: {exc}"


def _no_documents(builder: str, files: list[str]) -> bool:
    """True when the files certainly hold no rows (``datasets`` fails obscurely on those)."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            return sum(pq.ParquetFile(f).metadata.num_rows for f in files) == 0
        except Exception:
            return False  # unreadable: let the loader report it
    return all(os.path.getsize(f) == 0 for f in files)


def _load(src: SourceConfig, cfg: DataConfig, where: str):
    """The ``datasets`` Dataset / IterableDataset for a files or hub source."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        if src.kind == "files":
            builder, files = resolve_files(src.path, where)
            kwargs = {"sample_by": src.text_sample_by} if builder == "text" else {}
            empty = DataError(f"{src.path} ({where}.path) holds no documents: give a dataset with at least one row.")
            if _no_documents(builder, files):
                raise empty
            try:
                return datasets.load_dataset(
                    builder,
                    data_files=files,
                    split="train",
                    streaming=src.streaming,
                    cache_dir=cfg.cache_dir,
                    **kwargs,
                )
            except Exception as exc:
                if "corresponds to no data" in str(exc):
                    raise empty from exc
                raise DataError(
                    f"cannot read {src.path} ({where}) as {builder} ({_root_cause(exc)}): "
                    f"check that the files are valid {builder}."
                ) from exc
        try:
            return datasets.load_dataset(
                src.path, src.name, split=src.split, streaming=src.streaming, cache_dir=cfg.cache_dir
            )
        except Exception as exc:
            raise DataError(
                f"cannot load hub dataset {src.path!r} ({where}): {_root_cause(exc)}; check the name "
                "and split, that the network is reachable (HF_HUB_OFFLINE unset), or use kind: files."
            ) from exc
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _check_field(columns, src: SourceConfig, where: str) -> None:
    if columns is not None and src.text_field not in columns:
        raise DataError(
            f"{where} ({src.path}) has no field {src.text_field!r}; its fields are {', '.join(columns)}: "
            f"set {where}.text_field to the text column."
        )


class FileSource:
    """Random-access documents of a loaded ``datasets.Dataset``."""

    def __init__(self, src: SourceConfig, index: int, cfg: DataConfig, tokenizer, seed: int, split: str, where: str):
        ds = _load(src, cfg, where)
        _check_field(ds.column_names, src, where)
        n = len(ds)
        if n == 0:
            raise DataError(f"{src.path} ({where}.path) holds no documents: give a dataset with at least one row.")
        self._texts = ds.select_columns([src.text_field])
        self._field, self._where = src.text_field, f"{where}.{src.text_field}"
        self._cfg, self._tokenizer = cfg, tokenizer
        self._key = (int(seed), SPLIT_TAGS[split], index)
        self.docs = self._split_indices(n, cfg.heldout_fraction, split)
        self._probs = None
        if cfg.upsample_long > 0 and split == "train":
            self._probs = self._length_probs(cfg.upsample_long)
        self._epochs: dict[int, np.ndarray] = {}

    @staticmethod
    def _split_indices(n: int, fraction: float, split: str) -> np.ndarray:
        n_held = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(fraction * n)))
        if n_held == 0:
            return np.arange(n)  # nothing can be held out: both splits see every document
        held = np.sort(np.random.default_rng(_HELDOUT_KEY).permutation(n)[:n_held])
        return held if split == "heldout" else np.setdiff1d(np.arange(n), held)

    def _length_probs(self, alpha: float) -> np.ndarray:
        import pyarrow.compute as pc

        column = self._texts.data.column(self._field)
        chars = np.asarray(pc.utf8_length(column).fill_null(0), np.float64)[self.docs]
        w = np.maximum(chars, 1.0) ** alpha
        return w / w.sum()

    def _order(self, epoch: int) -> np.ndarray:
        order = self._epochs.get(epoch)
        if order is None:
            rng = np.random.default_rng([*self._key, epoch])
            n = len(self.docs)
            order = rng.permutation(n) if self._probs is None else rng.choice(n, size=n, p=self._probs)
            self._epochs = {epoch: order}  # documents are requested in order: keep one epoch
        return order

    def get(self, m: int) -> Doc:
        epoch, i = divmod(m, len(self.docs))
        row = int(self.docs[self._order(epoch)[i]])
        return encode_text(self._texts[row][self._field], self._tokenizer, self._cfg, self._where)


class StreamSource:
    """Documents of a streaming ``datasets.IterableDataset``, in order, pass after pass."""

    def __init__(self, src: SourceConfig, index: int, cfg: DataConfig, tokenizer, seed: int, split: str, where: str):
        self._ds = _load(src, cfg, where)
        self._src, self._cfg, self._tokenizer, self._split = src, cfg, tokenizer, split
        self._where = f"{where}.{src.text_field}"
        self._where_src = where
        self._iter = None
        self._next_m = 0  # index of the document the iterator yields next
        self._last: Doc | None = None
        self._field_checked = False

    def _keep(self, raw_index: int) -> bool:
        frac = self._cfg.heldout_fraction
        if frac <= 0:
            return True
        return _heldout_hash(raw_index, frac) == (self._split == "heldout")

    def _documents(self):
        """Endless kept texts: pass after pass over the stream."""
        while True:
            kept = 0
            for raw, example in enumerate(self._ds):
                if not self._field_checked:
                    _check_field(list(example), self._src, self._where_src)
                    self._field_checked = True
                if self._keep(raw):
                    kept += 1
                    yield example[self._src.text_field]
            if kept == 0:
                what = "held-out documents (raise heldout_fraction)" if self._split == "heldout" else "documents"
                raise DataError(f"{self._where_src} ({self._src.path}) yields no {what}.")

    def get(self, m: int) -> Doc:
        if self._last is not None and m == self._next_m - 1:
            return self._last
        if self._iter is None or m < self._next_m:
            self._iter, self._next_m = self._documents(), 0
        while self._next_m <= m:
            text = next(self._iter)
            self._next_m += 1
        self._last = encode_text(text, self._tokenizer, self._cfg, self._where)
        return self._last


def build_source(src: SourceConfig, index: int, cfg: DataConfig, tokenizer, seed: int, split: str, seq_len: int):
    """The runtime source for ``src`` (``index`` is its place in ``cfg.sources``)."""
    where = f"data.sources[{index}]"
    if src.kind == "synthetic":
        return SyntheticSource(src, index, cfg, tokenizer, seed, split, seq_len, where)
    cls = StreamSource if src.streaming else FileSource
    return cls(src, index, cfg, tokenizer, seed, split, where)
