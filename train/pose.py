"""PoSE: positional skip-wise training (Zhu et al., arXiv 2309.10400) on packed rows.

    pose = PoseConfig(target_length=4096, chunks=2)          # a stage's ``pose:`` option
    batch = pose_batch(batch, pose, pose_rng(seed, batch_index))

The training window stays at the stage's ``seq_len`` L; only the position ids change. Each row
is cut into ``chunks`` N pieces at random column boundaries ``0 = c_0 < c_1 < … < c_{N-1} < L``
and chunk i is shifted by a skip ``u_i``, so its positions are ``c_i + u_i + arange(len_i)``.
As in the paper (and the authors' code), ``u_0 = 0`` and each later skip is uniform between the
previous one and ``T − L``: ``u`` is non-decreasing, and the last position ``L − 1 + u_{N-1}``
is below T. The model then sees relative distances up to ``T − 1`` at the cost of L tokens.
Chunk boundaries are uniform over the row (every chunk non-empty); tokens stay contiguous
(the paper's main setting), only their positions skip.

Packed documents: a row holds several documents (segment ids 1, 2, …; 0 is padding) and
attention masks come from (position, segment) pairs, so only distances *inside* a segment
matter — RoPE is relative and the causal test compares positions of one segment. Each
document piece therefore gets the row's PoSE positions minus their value at its own first
column: it starts at position 0 (a document continued from the previous row too), and its
positions jump by ``u_i − u_{i−1}`` where it crosses boundary ``c_i``. Every position stays
in ``[0, T)`` and increases strictly within a segment. Padding keeps its column positions.
A document that lies inside one chunk sees no skip, so PoSE works best on long documents.
(`train.packing.unpack_documents` rejoins a continued document by the target its previous row ends with.)

Randomness: one `numpy.random.Generator` per batch from ``(seed, batch index)`` (`pose_rng`),
so an iterator restored from its saved state (which holds the batch count) draws the same
chunks, and the draw never depends on process count or ring layout (it is made on the global
batch in contiguous order, before the host slice and the layout permutation).

Shape letters (the legend in `attention`): b rows of the batch, t columns of a row, j chunks of a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.config import ConfigError

# Separates the PoSE draws from every other stream derived from the same seed.
POSE_STREAM = 0x9053


@dataclass(frozen=True)
class PoseConfig:
    """A stage's PoSE option: positions spanning ``target_length`` on a ``seq_len`` window."""

    target_length: int
    """the length T the position ids span, [0, T) (≥ the stage's seq_len)"""
    chunks: int = 2
    """chunks per row; chunk i > 0 is shifted by a random skip (1: no skips)"""


def check_pose(pose: PoseConfig, seq_len: int, where: str = "pose") -> None:
    """Raise a one-sentence `ConfigError` unless ``pose`` fits a window of ``seq_len`` tokens."""
    if pose.chunks < 1:
        raise ConfigError(f"{where}.chunks must be ≥ 1, got {pose.chunks}: use 2 (the paper's setting).")
    if pose.chunks > seq_len:
        raise ConfigError(
            f"{where}.chunks {pose.chunks} exceeds the seq_len {seq_len}: every chunk needs a token; use fewer."
        )
    if pose.target_length < seq_len:
        raise ConfigError(
            f"{where}.target_length {pose.target_length} is below the stage's seq_len {seq_len}: PoSE spans a "
            "longer length than it trains on, so set target_length ≥ seq_len (or drop pose)."
        )


def pose_rng(seed: int, batch_index: int) -> np.random.Generator:
    """The generator for the PoSE draw of batch ``batch_index`` of a stream seeded ``seed``."""
    return np.random.default_rng([POSE_STREAM, int(seed), int(batch_index)])


def draw_chunks(
    rng: np.random.Generator, rows: int, seq_len: int, target_length: int, chunks: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw each row's chunk starts and skips.

    Args:
        rng: the generator (consumed).
        rows: rows r to draw for.
        seq_len: window L.
        target_length: span T ≥ L.
        chunks: N in ``[1, L]``.

    Returns:
        ``(starts, skips)``, int64 ``[b, j]``: ``starts[:, 0] = 0 < starts[:, 1] < … < L`` (chunk i is
        columns ``[starts_i, starts_{i+1})``) and ``0 = skips[:, 0] ≤ skips[:, 1] ≤ … ≤ T − L``.
    """
    check_pose(PoseConfig(target_length, chunks), seq_len)
    room = target_length - seq_len
    starts = np.zeros((rows, chunks), np.int64)
    skips = np.zeros((rows, chunks), np.int64)
    for r in range(rows):
        if chunks > 1:
            # N−1 distinct cuts in 1..L−1: uniform chunk boundaries with every chunk non-empty.
            starts[r, 1:] = np.sort(rng.choice(seq_len - 1, chunks - 1, replace=False) + 1)
        for i in range(1, chunks):
            skips[r, i] = rng.integers(skips[r, i - 1], room + 1)  # u_i ~ U{u_{i−1}, …, T − L}
    return starts, skips


def chunk_positions(starts: np.ndarray, skips: np.ndarray, seq_len: int) -> np.ndarray:
    """Row positions ``c + skips[chunk(c)]`` for columns ``c`` of a window: int32 ``[b, t]``."""
    col_t = np.arange(seq_len, dtype=np.int64)
    chunk_bt = np.sum(col_t[None, None, :] >= starts[:, :, None], axis=1) - 1  # [b, t]: chunk of each column
    return (col_t[None, :] + np.take_along_axis(skips, chunk_bt, axis=1)).astype(np.int32)


def draw_pose_positions(
    rng: np.random.Generator, seq_len: int, target_length: int, chunks: int = 2, rows: int = 1
) -> np.ndarray:
    """PoSE position ids of ``rows`` windows of ``seq_len`` tokens spanning ``target_length``.

    Returns:
        int32 ``[rows, seq_len]``, strictly increasing along each row, first 0, all below ``target_length``.
    """
    return chunk_positions(*draw_chunks(rng, rows, seq_len, target_length, chunks), seq_len)


def apply_pose(batch: dict[str, np.ndarray], row_positions: np.ndarray) -> dict[str, np.ndarray]:
    """A packed contiguous-layout batch with its document positions replaced by PoSE row positions.

    Args:
        batch: ``[b, t]`` arrays with ``positions`` and ``segment_ids`` (as from `train.packing`).
        row_positions: int ``[b, t]`` from `draw_pose_positions` / `chunk_positions`.

    Returns:
        A new dict (other arrays shared): each document piece's positions are ``row_positions``
        minus their value at the piece's first column (module docstring); padding unchanged.
    """
    seg_bt = batch["segment_ids"]
    rows, t = seg_bt.shape
    first_bt = np.ones((rows, t), bool)
    first_bt[:, 1:] = seg_bt[:, 1:] != seg_bt[:, :-1]
    start_bt = np.maximum.accumulate(np.where(first_bt, np.arange(t), 0), axis=1)  # first column of the piece
    rebased = row_positions - np.take_along_axis(row_positions, start_bt, axis=1)
    positions = np.where(seg_bt > 0, rebased, batch["positions"]).astype(np.int32)
    return {**batch, "positions": positions}


def pose_batch(batch: dict[str, np.ndarray], pose: PoseConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draw one PoSE pattern per row of a contiguous packed batch and apply it (`apply_pose`)."""
    rows, seq_len = batch["positions"].shape
    return apply_pose(batch, draw_pose_positions(rng, seq_len, pose.target_length, pose.chunks, rows))


__all__ = [
    "PoseConfig",
    "apply_pose",
    "check_pose",
    "chunk_positions",
    "draw_chunks",
    "draw_pose_positions",
    "pose_batch",
    "pose_rng",
]
