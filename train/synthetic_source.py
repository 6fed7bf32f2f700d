"""Synthetic long-context training documents from the shared generator in `text.synthetic`.

The evals score exactly the prompts this source trains on (same templates, haystacks and
tokenization); there is one generator, and this module only decides lengths, depths and
seeds and turns a `text.Sample` into a weighted training document:

    document = prompt_ids (BOS … question answer-prefix) + answer_ids [+ EOS]
    weights  = context_weight on prompt tokens and EOS, answer_weight on answer tokens

Document ``m`` of split ``s`` is a pure function of ``(seed, s, source index, m)``: its total
length is drawn uniformly from ``[min_length, max_length]``, the needle depth(s) uniformly
from [0, 1], and the prompt is sized so that prompt + answer (+ EOS) is exactly that length
(a task whose fixed text is longer than ``min_length`` gets its minimum length instead).
Tasks: ``passkey`` (5-digit key in filler), ``niah`` (one sentence in prose),
``multi_needle`` (``needles`` numbered doors, recall all) and ``prose`` (haystack text only).
"""

from __future__ import annotations

import functools
import warnings

import numpy as np

from text import OverheadError, load_haystack, multi_niah_sample, niah_sample, passkey_sample, token_stream
from train.data_config import SPLIT_TAGS, DataConfig, DataError, SourceConfig
from train.packing import Doc

_DEFAULT_HAYSTACK = {"passkey": "classic", "niah": "prose", "multi_needle": "prose", "prose": "prose"}


def _generate(task: str, tokenizer, length: int, rng: np.random.Generator, haystack: str, needles: int, template: str):
    if task == "passkey":
        return passkey_sample(tokenizer, length, float(rng.random()), rng, filler=haystack, template=template)
    if task == "niah":
        return niah_sample(tokenizer, length, float(rng.random()), rng, haystack=haystack)
    depths = sorted(float(d) for d in rng.random(needles))
    return multi_niah_sample(tokenizer, length, depths, rng, haystack=haystack)


@functools.lru_cache(maxsize=32)
def _min_prompt(task: str, tokenizer, haystack: str, needles: int, template: str) -> int:
    """Smallest prompt length the task's fixed text allows (max over a few seeds: needle texts vary)."""
    worst = 1
    for seed in range(4):
        lo, hi = 1, 64
        while True:  # grow until it fits, then bisect
            try:
                _generate(task, tokenizer, hi, np.random.default_rng(seed), haystack, needles, template)
                break
            except OverheadError:
                lo, hi = hi, hi * 2
                if hi > 1 << 22:
                    msg = f"synthetic {task} prompts do not fit in {hi} tokens with this tokenizer."
                    raise DataError(msg) from None
        while lo < hi:
            mid = (lo + hi) // 2
            try:
                _generate(task, tokenizer, mid, np.random.default_rng(seed), haystack, needles, template)
                hi = mid
            except OverheadError:
                lo = mid + 1
        worst = max(worst, hi)
    return worst


class SyntheticSource:
    """Passkey / needle / prose documents generated on demand, deterministic per index."""

    def __init__(
        self,
        src: SourceConfig,
        index: int,
        cfg: DataConfig,
        tokenizer,
        seed: int,
        split: str,
        seq_len: int,
        where: str,
    ):
        self._src, self._tokenizer = src, tokenizer
        self._key = (int(seed), SPLIT_TAGS[split], index)
        self._haystack = src.haystack or _DEFAULT_HAYSTACK[src.task]
        self._bos = [tokenizer.bos_id] if cfg.add_bos and tokenizer.bos_id is not None else []
        self._eos = [tokenizer.eos_id] if cfg.add_eos and tokenizer.eos_id is not None else []
        hi = src.max_length or seq_len
        lo = src.min_length or max(1, min(hi, seq_len // 4))
        if src.task == "prose":
            self._stream = token_stream(tokenizer, load_haystack(self._haystack))
            floor = len(self._bos) + len(self._eos) + 1
        else:
            # prompt + answer (+ EOS). The answer length of one sample is the first guess when sizing prompts.
            probe = _generate(
                src.task, tokenizer, 4096, np.random.default_rng(0), self._haystack, src.needles, src.template
            )
            self._answer_guess = len(probe.answer_ids)
            self._min_prompt = _min_prompt(src.task, tokenizer, self._haystack, src.needles, src.template)
            floor = self._min_prompt + self._answer_guess + len(self._eos)
        if hi < floor:
            warnings.warn(
                f"{where}: synthetic {src.task} documents need ≥ {floor} tokens with this tokenizer but max_length is "
                f"{hi}; using {floor} (such documents continue across rows).",
                stacklevel=2,
            )
        self.min_length, self.max_length = max(lo, floor), max(hi, floor)

    def get(self, m: int) -> Doc:
        rng = np.random.default_rng([*self._key, m])
        total = int(rng.integers(self.min_length, self.max_length + 1))
        sample_seed = int(rng.integers(1 << 62))
        src = self._src
        if src.task == "prose":
            body = total - len(self._bos) - len(self._eos)
            ids, _ = self._stream.take(int(rng.integers(len(self._stream.starts))), body)
            return Doc(np.asarray(self._bos + ids.tolist() + self._eos, np.int32))

        def make(prompt_len: int):
            """The sample of this seed with the shortest prompt ≥ prompt_len that holds the fixed text."""
            while True:
                g = np.random.default_rng(sample_seed)  # same seed → same key/needles → same answer length
                try:
                    tok, hay = self._tokenizer, self._haystack
                    return _generate(src.task, tok, prompt_len, g, hay, src.needles, src.template)
                except OverheadError:  # this seed's needles are longer than the probed minimum
                    prompt_len += 8

        target = total - len(self._eos)
        sample = make(max(self._min_prompt, target - self._answer_guess))
        fitted = max(self._min_prompt, target - len(sample.answer_ids))
        if fitted != len(sample.prompt_ids):
            sample = make(fitted)
        ids = np.asarray(sample.prompt_ids + sample.answer_ids + self._eos, np.int32)
        weights = np.full(len(ids), src.context_weight, np.float32)
        p = len(sample.prompt_ids)
        weights[p : p + len(sample.answer_ids)] = src.answer_weight
        return Doc(ids, weights)
