"""Data pipeline throughput: packed tokens per second per host for the demo mix and for files.

    python -m benchmarks.data_pipeline [--seq-len 1024] [--batch 8] [--batches 50]

Cases: the demo's synthetic passkey + prose mix (byte tokenizer); jsonl documents of
pydoc prose with the byte tokenizer; the same with a BPE ``tokenizer.json`` trained here on
that prose (a stand-in for Llama 3's, which needs a download); and the zigzag layout.
Prints one markdown table row per case.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def _corpus(directory: str) -> str:
    from text import haystack_text

    text = haystack_text()
    path = os.path.join(directory, "prose.jsonl")
    with open(path, "w") as fh:
        step = 6000
        for i in range(0, len(text), step):
            fh.write(json.dumps({"text": text[i : i + step]}) + "\n")
    return path


def _bpe(directory: str, corpus: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    with open(corpus) as fh:
        tok.train_from_iterator((json.loads(line)["text"] for line in fh), trainer)
    path = os.path.join(directory, "tokenizer.json")
    tok.save(path)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as fh:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, fh)
    return directory


def measure(data: dict, seq_len: int, batch: int, batches: int, **kw) -> tuple[float, float]:
    """(packed tokens/s, mean ms per batch) over ``batches`` batches after one warm-up batch."""
    from train.data import make_iterator
    from train.data_config import DataConfig

    it = make_iterator(DataConfig.from_dict(data), seq_len, batch, seed=0, **kw)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - start
    return batches * batch * seq_len / seconds, 1e3 * seconds / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = _corpus(tmp)
        bpe = _bpe(tmp, corpus)
        demo = {
            "sources": [
                {"kind": "synthetic", "task": "passkey", "weight": 3},
                {"kind": "synthetic", "task": "prose", "weight": 1},
            ]
        }
        files = {"sources": [{"kind": "files", "path": corpus}], "packing": "split"}
        cases = [
            ("synthetic passkey+prose, byte", demo, {}),
            ("synthetic passkey+prose, byte, zigzag/4", demo, {"layout": "zigzag", "num_shards": 4}),
            ("jsonl prose, byte", files, {}),
            ("jsonl prose, BPE tokenizer.json (4K vocab)", {**files, "tokenizer": bpe}, {}),
        ]
        print(f"| case (seq {args.seq_len} x batch {args.batch}) | packed tokens/s | ms / batch |")
        print("|---|---:|---:|")
        for name, data, kw in cases:
            tps, ms = measure(data, args.seq_len, args.batch, args.batches, **kw)
            print(f"| {name} | {tps:,.0f} | {ms:.2f} |")


if __name__ == "__main__":
    main()
