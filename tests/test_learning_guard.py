"""Learning guard: a 2-layer model trained through the real runner learns a retrieval task.

Perplexity can keep falling while a pipeline bug (segment ids leaking between packed
documents, wrong zigzag positions, a mis-shifted loss mask) kills retrieval, so this trains
through `train.curriculum.run` — files source, packed documents with segment ids, zigzag
layout on the emulated data=2 × sequence=4 mesh, ring attention — and then scores, outside the
training code (plain model apply, dense attention), whether the model copies a key it can
only find by content: each document is a predictable filler with one capital letter at a random
place, then ``?`` and that letter. Several documents share a 64-token row, each holding its own
capital, so attention leaking across segment ids (or positions out of step with the tokens)
answers with another document's letter; chance is 1/26. Measured while choosing it: 150 steps at
lr 1e-2 reach 100%; random filler, or 8–48-character fillers at lr 3e-3, stayed at chance for 200–300
steps (the retrieval plateau), so the short documents and the high LR are what keep this fast.
"""

import json
import string

import jax.numpy as jnp
import numpy as np

import convert
from model.llama import Llama
from text.tokenizer import ByteTokenizer
from train.config import from_dict
from train.curriculum import run


def _doc(rng: np.random.Generator) -> tuple[str, str]:
    key = str(rng.choice(list(string.ascii_uppercase)))
    filler = ("the sky is blue. " * 4)[: int(rng.integers(4, 24))]  # predictable: the loss left is the key
    cut = int(rng.integers(0, len(filler) + 1))
    return f"{filler[:cut]}{key}{filler[cut:]}?", key


def test_two_layer_model_learns_retrieval_through_the_runner(tmp_path):
    rng = np.random.default_rng(0)
    with open(tmp_path / "train.jsonl", "w") as fh:
        for _ in range(4000):
            prompt, key = _doc(rng)
            fh.write(json.dumps({"text": prompt + key}) + "\n")
    raw = {
        "model": {"preset": "tiny", "num_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
                  "num_kv_heads": 2, "head_dim": 16, "max_position_embeddings": 64, "rope": {"theta": 1000.0}},
        "data": {"sources": [{"kind": "files", "path": str(tmp_path / "train.jsonl")}], "heldout_fraction": 0.0},
        "mesh": {"data": 2, "fsdp": 1, "tensor": 1, "sequence": 4},
        "optim": {"lr": 1e-2, "warmup_steps": 10, "schedule": "constant", "weight_decay": 0.0},
        "stages": [{"name": "retrieve", "seq_len": 64, "steps": 150, "batch_size": 16}],
        "checkpoint": {"every": 0, "keep": 1, "async_save": False},
        "eval": {"heldout_batches": 0},
        "loss_chunk": 64,
        "tensorboard": False,
        "progress": False,
        "run_dir": str(tmp_path / "run"),
    }  # fmt: skip
    run(from_dict(raw), say=lambda *a, **k: None)

    cfg, params = convert.load_model(str(tmp_path / "run" / "final"), dtype="float32")
    cfg = cfg.replace(attention_impl="reference", dtype="float32")
    tok, fresh = ByteTokenizer(), np.random.default_rng(12345)
    docs = [_doc(fresh) for _ in range(64)]
    rows = [[tok.bos_id, *tok.encode(p + k)] for p, k in docs]
    width = max(map(len, rows))
    tokens = np.full((len(rows), width), tok.pad_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    logits = np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray(tokens)))
    pred = logits.argmax(-1)  # pred[:, t] predicts tokens[:, t + 1]
    hits = [pred[i, len(r) - 2] == r[-1] for i, r in enumerate(rows)]  # the logits at "?" predict the key
    assert np.mean(hits) >= 0.9, f"teacher-forced key accuracy {np.mean(hits):.0%} after training (want ≥ 90%)"
