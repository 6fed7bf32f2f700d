"""The training data iterator: mixed sources → packed ``[batch, seq]`` rows → this host's slice, in ring layout.

    it = make_iterator(data_cfg, seq_len=1024, batch_size=8, seed=0, layout="zigzag", num_shards=4)
    batch = next(it)        # dict of numpy [rows, seq]: tokens, targets, positions, segment_ids, loss_mask
    saved = it.state()      # JSON-serialisable; it.restore(saved) continues exactly from here

How a batch is made:

1. **Mixture.** One stream of documents; each next document comes from the source that is
   furthest below its share of tokens so far (``tokens_s / weight_s`` smallest, ties to the
   first source). Weights are therefore token shares, met at every point of the stream to
   within one document, with no randomness to replay.
2. **Sources** hand out their m-th document deterministically from the seed (`train.sources`,
   `train.synthetic_source`).
3. **Packing** (`train.packing`): ``batch_size`` rows are filled one after another from the
   stream; a long document continues into the next row (positions continuing).
   With a stage's ``pose`` option (`train.pose`) the positions of the global batch are then
   redrawn PoSE-style from ``(seed, batch index)``.
4. **Hosts.** Every process builds the same global batch and keeps rows
   ``[p·B/P, (p+1)·B/P)``, so the global batch — and the loss — does not depend on the number
   of processes, and a saved state restores under any process count. (Each host tokenizes
   the whole global batch; cheap next to a long-context train step.)
5. **Layout.** With ``layout="zigzag"``/``"striped"`` every array is permuted along the
   sequence with `attention.layout.to_layout`, ready to be sharded over the ``sequence`` axis;
   masks come from positions and segment ids, so attention stays exact.

State: the mixture counters (documents and tokens taken per source) as they were before the
document in progress, and how many of its tokens are already packed. It restores under any
``batch_size``, process count or layout; under another ``seq_len`` file documents continue
where they were, while synthetic ones are sized for the new length.

Held-out batches (`heldout_batches`) come from the held-out split: documents kept out of
training for file/hub sources, a disjoint seed stream for synthetic ones.
"""

from __future__ import annotations

import numpy as np

from attention.layout import check_layout, to_layout
from text.tokenizer import load_tokenizer
from train.data_config import SPLIT_TAGS, DataConfig, DataError
from train.packing import BATCH_FIELDS, Cursor, Doc, empty_rows, fill_row
from train.pose import PoseConfig, check_pose, pose_batch, pose_rng
from train.prefetch import Prefetcher
from train.sources import build_source

Batch = dict[str, np.ndarray]
STATE_VERSION = 1


class MixtureStream:
    """Documents from several sources by token deficit against the weights."""

    def __init__(self, sources: list, weights: list[float]):
        self.sources = sources
        w = np.asarray(weights, np.float64)
        self.shares = w / w.sum()
        self.docs = [0] * len(sources)  # documents taken from each source
        self.tokens = [0] * len(sources)  # tokens in those documents

    def next_doc(self) -> Doc:
        s = int(np.argmin(np.asarray(self.tokens, np.float64) / self.shares))
        doc = self.sources[s].get(self.docs[s])
        self.docs[s] += 1
        self.tokens[s] += len(doc.ids)
        return doc

    def state(self) -> dict:
        return {"docs": list(self.docs), "tokens": list(self.tokens)}

    def restore(self, state: dict) -> None:
        self.docs, self.tokens = [int(x) for x in state["docs"]], [int(x) for x in state["tokens"]]


class DataIterator:
    """Endless packed batches; deterministic from the seed and resumable (`state` / `restore`).

    Use `make_iterator` / `heldout_batches` rather than constructing it directly.
    """

    def __init__(
        self,
        cfg: DataConfig,
        seq_len: int,
        batch_size: int,
        seed: int,
        *,
        layout: str = "contiguous",
        num_shards: int = 1,
        process_index: int = 0,
        process_count: int = 1,
        tokenizer=None,
        split: str = "train",
        pose: PoseConfig | None = None,
    ):
        if isinstance(cfg, dict):
            cfg = DataConfig.from_dict(cfg)
        if seq_len < 2 or batch_size < 1:
            raise DataError(f"seq_len ({seq_len}) must be ≥ 2 and batch_size ({batch_size}) ≥ 1.")
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index {process_index} is outside [0, {process_count}).")
        if batch_size % process_count:
            raise DataError(
                f"global batch size {batch_size} does not split over {process_count} processes: "
                f"use a multiple of {process_count}."
            )
        if split not in SPLIT_TAGS:
            raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLIT_TAGS)}.")
        check_layout(seq_len, num_shards, layout)
        if pose is not None:
            check_pose(pose, seq_len)
        if tokenizer is None:
            tokenizer = load_tokenizer(cfg.tokenizer)
        self.cfg, self.tokenizer, self.split = cfg, tokenizer, split
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        self.layout, self.num_shards = layout, int(num_shards)
        self.pose = pose
        rows = batch_size // process_count
        self.rows = slice(process_index * rows, (process_index + 1) * rows)
        sources = [build_source(s, i, cfg, tokenizer, seed, split, seq_len) for i, s in enumerate(cfg.sources)]
        self._mix = MixtureStream(sources, [s.weight for s in cfg.sources])
        self._doc_state = self._mix.state()  # mixture state before the document in progress
        self._cursor = Cursor(self._pull)
        self.batches = 0

    def _pull(self) -> Doc:
        self._doc_state = self._mix.state()
        return self._mix.next_doc()

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        out = empty_rows(self.batch_size, self.seq_len)
        for r in range(self.batch_size):
            fill_row(out, r, self._cursor, self.cfg.packing)
        if self.tokenizer.pad_id:
            out["tokens"][out["segment_ids"] == 0] = self.tokenizer.pad_id
        if self.split == "heldout":  # perplexity counts every token once: no answer weighting
            out["loss_mask"] = (out["loss_mask"] > 0).astype(np.float32)
        if self.pose is not None:  # drawn on the global batch by batch index: same under resume and any slicing
            out = pose_batch(out, self.pose, pose_rng(self.seed, self.batches))
        self.batches += 1
        local = {k: out[k][self.rows] for k in BATCH_FIELDS}
        if self.layout != "contiguous" and self.num_shards > 1:
            local = {k: np.ascontiguousarray(to_layout(v, self.num_shards, self.layout)) for k, v in local.items()}
        return local

    def state(self) -> dict:
        """JSON-serialisable position: restoring it continues with exactly the next batch."""
        in_progress = self._cursor.doc is not None
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "split": self.split,
            "sources": len(self.cfg.sources),
            "batches": self.batches,
            "mixture": self._doc_state if in_progress else self._mix.state(),
            "offset": self._cursor.offset if in_progress else 0,
        }

    def restore(self, state: dict) -> None:
        """Continue from a `state` (any seq_len / batch_size / process count / layout)."""
        try:
            version, seed, split = state["version"], state["seed"], state["split"]
            n_sources, mixture, offset = state["sources"], state["mixture"], int(state["offset"])
            batches = int(state["batches"])
        except (KeyError, TypeError) as exc:
            msg = f"not a data iterator state (missing {exc}): pass what DataIterator.state() returned."
            raise DataError(msg) from None
        if version != STATE_VERSION:
            raise DataError(f"data state version {version} is not {STATE_VERSION}: it was saved by another version.")
        if (seed, split, n_sources) != (self.seed, self.split, len(self.cfg.sources)):
            raise DataError(
                f"the data state was saved for seed {seed}, split {split!r}, {n_sources} sources, but this iterator "
                f"has seed {self.seed}, split {self.split!r}, {len(self.cfg.sources)} sources: use the run's own "
                "data config."
            )
        self._mix.restore(mixture)
        self._doc_state = self._mix.state()
        self._cursor = Cursor(self._pull)
        if offset:
            self._cursor.current()
            if offset >= len(self._cursor.doc.ids):
                raise DataError(f"data state offset {offset} is past the end of its document: the data has changed.")
            self._cursor.offset = offset
        self.batches = batches


def make_iterator(
    data_cfg: DataConfig | dict,
    seq_len: int,
    batch_size: int,
    seed: int,
    *,
    layout: str = "contiguous",
    num_shards: int = 1,
    process_index: int = 0,
    process_count: int = 1,
    tokenizer=None,
    prefetch: int = 0,
    pose: PoseConfig | None = None,
) -> DataIterator:
    """The training iterator: ``next(it)`` is this process's rows of the global batch.

    Args:
        data_cfg: a `DataConfig` (or its dict form).
        seq_len: tokens per row ``t`` (a multiple of ``2·num_shards`` for zigzag, ``num_shards`` for striped).
        batch_size: global rows ``B`` (a multiple of ``process_count``).
        seed: everything random derives from it.
        layout: ``contiguous`` | ``zigzag`` | ``striped``; rows come permuted into it.
        num_shards: size of the ``sequence`` mesh axis.
        process_index, process_count: this host's rows are ``[p·B/P, (p+1)·B/P)``.
        tokenizer: an already-loaded tokenizer (default: ``load_tokenizer(data_cfg.tokenizer)``).
        prefetch: make this many batches ahead in a background thread (`train.prefetch.Prefetcher`;
            same batches, same ``state()`` semantics); 0 = in the caller's thread.
        pose: PoSE positions spanning ``pose.target_length`` on rows of ``seq_len`` (`train.pose`); None: off.

    Returns:
        A `DataIterator` (or its `Prefetcher`) yielding dicts of ``[B/P, t]`` arrays: int32 ``tokens``, ``targets``,
        ``positions``, ``segment_ids`` and float32 ``loss_mask``.
    """
    it = DataIterator(
        data_cfg,
        seq_len,
        batch_size,
        seed,
        layout=layout,
        num_shards=num_shards,
        process_index=process_index,
        process_count=process_count,
        tokenizer=tokenizer,
        pose=pose,
    )
    if prefetch:
        return Prefetcher(it, prefetch)
    return it


def heldout_batches(
    data_cfg: DataConfig | dict,
    seq_len: int,
    batch_size: int,
    n_batches: int,
    seed: int,
    *,
    layout: str = "contiguous",
    num_shards: int = 1,
    process_index: int = 0,
    process_count: int = 1,
    tokenizer=None,
) -> list[Batch]:
    """``n_batches`` fixed batches for perplexity from the held-out split (same arguments as `make_iterator`).

    For a given seed the batches are the same every call, so perplexity is comparable across
    stages and runs; none of their documents is a training document (file sources with at
    least two documents and ``heldout_fraction > 0``; synthetic sources always). ``loss_mask``
    is 0/1 here (source loss weights are for training), so ``loss_sum / count`` is the mean
    per-token negative log-likelihood.
    """
    it = DataIterator(
        data_cfg,
        seq_len,
        batch_size,
        seed,
        layout=layout,
        num_shards=num_shards,
        process_index=process_index,
        process_count=process_count,
        tokenizer=tokenizer,
        split="heldout",
    )
    return [next(it) for _ in range(n_batches)]
