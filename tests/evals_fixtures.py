"""A tiny Hugging Face model directory with its own small BPE tokenizer, built locally for the eval tests."""

from __future__ import annotations

import json
import os

from hf_fixtures import tiny_hf_model

VOCAB = 384


def tiny_tokenizer_json(path: str) -> None:
    """Train a byte-level BPE tokenizer (384 ids; <pad>=0, <s>=1, </s>=2) on the pydoc prose, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from text import haystack_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([haystack_text()[:50_000]], trainer)
    tok.save(path)


def tiny_hf_dir(directory: str, seed: int = 0):
    """Save a random tiny `LlamaForCausalLM` (vocab 384, 2K positions) plus tokenizer files; returns the model."""
    model = tiny_hf_model(seed, vocab_size=VOCAB, max_position_embeddings=2048)
    model.save_pretrained(directory)
    tiny_tokenizer_json(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as fh:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, fh)
    return model
