"""Running a model on eval samples: teacher-forced scoring, greedy generation and per-token losses.

`Runner` batches samples, pads, and calls jit-compiled functions shared across calls of the
same shapes. Without a mesh everything runs on one device.
With a mesh whose ``sequence`` axis is > 1, forward passes use ring attention over that axis
(the model's activation rules shard the sequence) and generation prefills with ring
attention into a sequence-sharded KV cache (`evals.generation`), so prompts far longer
than one device holds are evaluated.

Logits are never materialised for the whole prompt: the model returns hidden states and the
head is applied only at the answer positions (teacher-forced) or in the training loss's strided
position chunks (`model.loss.chunked_token_nll`: even slices on every ring device, no gathers),
which matters with a 128K vocabulary at 100K+ tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from evals.generation import greedy_generate
from model.config import LlamaConfig
from model.generate import ring_size
from model.llama import Llama
from model.loss import chunked_token_nll
from model.params import lm_head_kernel
from sharding.rules import axis_rules, batch_sharding
from text.synthetic import Sample


@dataclass(frozen=True)
class ForcedResult:
    """Teacher-forced outcome for one sample: argmax ids at the answer positions and their log-probs."""

    argmax_ids: list[int]
    answer_logprob: float  # sum over answer tokens of log p(answer token)
    correct: bool


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@functools.partial(jax.jit, static_argnames=("config", "mesh"))
def _forced_fn(params, tokens, starts, targets, *, config, mesh):
    """``tokens [b, T]`` → argmax ``[b, A]`` and target log-probs ``[b, A]`` at ``starts[:, None] + arange(A)``."""
    with axis_rules(mesh):
        hidden = Llama(config, mesh).apply({"params": params}, tokens, return_hidden=True)  # [b, T, d]
    idx = starts[:, None] + jnp.arange(targets.shape[1])[None, :]  # [b, A]
    h = jnp.take_along_axis(hidden, idx[..., None], axis=1)  # [b, A, d]
    logits = jnp.einsum("bad,dv->bav", h, lm_head_kernel(params, config).astype(h.dtype)).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)  # [b, A, v]
    target_lp = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.where(targets >= 0, target_lp, 0.0)


@functools.partial(jax.jit, static_argnames=("config", "mesh", "chunk"))
def _nll_fn(params, tokens, *, config, mesh, chunk):
    """Per-position next-token NLL ``[b, T-1]`` (fp32) through the training loss's chunks (`model.loss`)."""
    # Score all T positions (the last one's target is a dummy 0, dropped) so the chunks split evenly over the ring.
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    with axis_rules(mesh):
        hidden = Llama(config, mesh).apply({"params": params}, tokens, return_hidden=True)  # [b, T, d]
        nll = chunked_token_nll(hidden, lm_head_kernel(params, config), targets, chunk, mesh)  # [b, T]
    return nll[:, :-1]


def _nll_chunk(t: int, chunk: int, ring: int) -> int:
    """At most ``chunk`` positions per loss chunk; on a ring, chunks of a size that splits evenly over it.

    `model.loss` cuts ``t`` positions into ``n = ceil(t / chunk)`` strided chunks of ``t / n``; with
    ``t`` a multiple of the ring size, ``n`` dividing ``t / ring`` gives every device an equal slice.
    """
    n = -(-t // chunk)
    while ring > 1 and (t // ring) % n:
        n += 1
    return -(-t // n)


@dataclass
class Runner:
    """A model ready for evals.

    Args:
        config, params: the model (params already placed; `evals.loading` shards them over ``mesh``).
        mesh: None for one device; a mesh with a ``sequence`` axis > 1 turns on ring prefill.
        batch_size: samples per forward pass.
        pad_multiple: padded sequence lengths are rounded up to this (fewer recompiles; for the
            ring it is also rounded to a multiple of the sequence axis size).
    """

    config: LlamaConfig
    params: Any
    mesh: Any = None
    batch_size: int = 1
    pad_multiple: int = 64
    pad_id: int = 0

    @property
    def ring(self) -> bool:
        return ring_size(self.mesh) > 1

    @property
    def forward_config(self) -> LlamaConfig:
        return self.config.replace(attention_impl="ring") if self.ring else self.config

    def _pad_len(self, n: int) -> int:
        multiple = self.pad_multiple
        if self.ring:  # every ring shard gets the same number of tokens
            multiple = int(np.lcm(multiple, ring_size(self.mesh)))
        return _round_up(n, multiple)

    def _put(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, batch_sharding(self.mesh, x.shape))

    def _batches(self, samples: Sequence[Sample]):
        for i in range(0, len(samples), self.batch_size):
            yield samples[i : i + self.batch_size]

    def forced(self, samples: Sequence[Sample]) -> list[ForcedResult]:
        """Teacher-forced: one forward over prompt + answer; correct iff every answer token is the argmax."""
        out: list[ForcedResult] = []
        for batch in self._batches(samples):
            a_max = _round_up(max(len(s.answer_ids) for s in batch), 16)  # fewer distinct shapes, fewer compiles
            seqs = [s.prompt_ids + s.answer_ids[:-1] for s in batch]
            t = self._pad_len(max(len(x) for x in seqs))
            tokens = np.full((self.batch_size, t), self.pad_id, np.int32)  # a full batch every time: one compile
            targets = np.full((self.batch_size, a_max), -1, np.int32)
            starts = np.zeros((self.batch_size,), np.int32)
            for r, (s, seq) in enumerate(zip(batch, seqs, strict=True)):
                tokens[r, : len(seq)] = seq
                targets[r, : len(s.answer_ids)] = s.answer_ids
                starts[r] = len(s.prompt_ids) - 1
            argmax, lp = _forced_fn(
                self.params,
                self._put(tokens),
                jnp.asarray(starts),
                jnp.asarray(targets),
                config=self.forward_config,
                mesh=self.mesh,
            )
            argmax, lp = np.asarray(argmax), np.asarray(lp)
            for r, s in enumerate(batch):
                n = len(s.answer_ids)
                ids = argmax[r, :n].tolist()
                out.append(ForcedResult(ids, float(lp[r, :n].sum()), ids == list(s.answer_ids)))
        return out

    def generate(self, samples: Sequence[Sample], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations (up to ``max_new_tokens``, cut at EOS) for each sample's prompt."""
        out: dict[int, list[int]] = {}
        eos = tuple(self.config.eos_token_id)
        by_len: dict[int, list[int]] = {}
        for i, s in enumerate(samples):  # model.generate takes equal-length prompts: group by length
            by_len.setdefault(len(s.prompt_ids), []).append(i)
        for length, idx in by_len.items():
            for j in range(0, len(idx), self.batch_size):
                chunk = idx[j : j + self.batch_size]
                prompt = np.zeros((self.batch_size, length), np.int32)
                for r, i in enumerate(chunk):
                    prompt[r] = samples[i].prompt_ids
                prompt[len(chunk) :] = prompt[0]
                new = greedy_generate(self.config, self.params, prompt, max_new_tokens, self.mesh, eos_ids=eos)
                for r, i in enumerate(chunk):
                    out[i] = _cut_at_eos(np.asarray(new[r]).tolist(), eos)
        return [out[i] for i in range(len(samples))]

    def token_nll(self, tokens: np.ndarray, chunk: int = 512) -> np.ndarray:
        """Next-token NLL ``[b, T-1]`` for ``tokens [b, T]`` (one forward; ring attention with a mesh)."""
        b, t = tokens.shape
        padded = np.zeros((b, self._pad_len(t)), np.int32)
        padded[:, :t] = tokens
        chunk = _nll_chunk(padded.shape[1], min(chunk, t), ring_size(self.mesh))
        nll = _nll_fn(self.params, self._put(padded), config=self.forward_config, mesh=self.mesh, chunk=chunk)
        return np.asarray(nll)[:, : t - 1]


def _cut_at_eos(ids: list[int], eos: tuple[int, ...]) -> list[int]:
    for k, tok in enumerate(ids):
        if tok in eos:
            return ids[:k]
    return ids
