"""LoRA export both ways: merged HF model (`flax-to-hf --merge-lora`) and a PEFT adapter directory
(`flax-to-peft`), each loaded by transformers / peft and compared with ringllama's adapted logits."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from hf_fixtures import hf_logits, one_torch_thread, tiny_hf_model  # noqa: F401

import convert
from convert.cli import main
from convert.peft import PEFT_CONFIG, PEFT_WEIGHTS, load_lora_checkpoint, save_lora_checkpoint
from model import Llama
from model import lora as lora_lib
from model.params import init_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = 1e-4  # fp32 parity tolerance of tests/test_parity.py


def _adapted(base_params, cfg, lora, seed=1):
    """Base params plus adapters with random (nonzero) A and B, and perturbed trained leaves."""
    fresh = init_params(cfg, jax.random.key(seed), lora=lora)
    rng = np.random.default_rng(seed)
    out = lora_lib.combine(base_params, lora_lib.adapters(fresh))

    def perturb(path, x):
        keys = lora_lib._keys(path)
        x = np.asarray(x, np.float32)
        if keys[-1] == "lora_b":
            return 0.05 * rng.standard_normal(x.shape).astype(np.float32)
        if lora_lib.is_trainable(keys, lora):
            return x + 0.05 * rng.standard_normal(x.shape).astype(np.float32)
        return x

    return jax.tree_util.tree_map_with_path(perturb, out)


@pytest.fixture(scope="module", params=["untied", "tied"])
def exported(request, tmp_path_factory):
    """A base HF model, a LoRA checkpoint over it, and the merged / PEFT exports of that checkpoint.

    "tied" is a Llama 3.2-style base (``tie_word_embeddings``) whose trained embedding is also the head."""
    tmp = tmp_path_factory.mktemp("peft")
    hf = tiny_hf_model(seed=3, tie_word_embeddings=request.param == "tied")
    base_dir = tmp / "base-hf"
    hf.save_pretrained(base_dir, safe_serialization=True)
    cfg, base = convert.load_hf(base_dir, "float32", scan_layers=True)
    lora = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
    params = _adapted(base, cfg, lora)
    save_lora_checkpoint(tmp / "lora", cfg, lora, params, base_model_name_or_path=str(base_dir))
    assert main(["flax-to-hf", str(tmp / "lora"), str(tmp / "merged"), "--merge-lora"]) == 0
    assert main(["flax-to-peft", str(tmp / "lora"), str(tmp / "adapter")]) == 0
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
    ours = np.asarray(Llama(cfg, lora=lora).apply({"params": params}, tokens), np.float32)
    return dict(tmp=tmp, cfg=cfg, lora=lora, params=params, base_dir=base_dir, tokens=tokens, ours=ours)


def test_lora_checkpoint_round_trip(exported):
    cfg, lora, params, base_name = load_lora_checkpoint(exported["tmp"] / "lora")
    assert lora == exported["lora"] and base_name == str(exported["base_dir"])
    want = dict(convert.tree.flatten(exported["params"]))
    got = dict(convert.tree.flatten(params))
    assert set(got) == set(want)
    for path, leaf in want.items():
        np.testing.assert_array_equal(got[path], leaf, err_msg="/".join(path))


def test_merged_export_matches_ringllama(exported):
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(exported["tmp"] / "merged", torch_dtype="float32").eval()
    theirs = hf_logits(model, exported["tokens"])
    base = transformers.LlamaForCausalLM.from_pretrained(exported["base_dir"], torch_dtype="float32").eval()
    # The adapters must matter, or equality below would prove nothing.
    assert np.abs(hf_logits(base, exported["tokens"]) - exported["ours"]).max() > 100 * TOL
    np.testing.assert_allclose(theirs, exported["ours"], atol=TOL, rtol=0)


def test_peft_adapter_matches_ringllama_and_merged(exported):
    import peft
    import transformers

    config = json.loads((exported["tmp"] / "adapter" / PEFT_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["base_model_name_or_path"] == str(exported["base_dir"])
    assert sorted(config["target_modules"]) == sorted(lora_lib.TARGETS.values())
    from safetensors import safe_open

    with safe_open(str(exported["tmp"] / "adapter" / PEFT_WEIGHTS), "np") as fh:
        keys = set(fh.keys())
        a = fh.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        b = fh.get_tensor("base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight")
    cfg = exported["cfg"]
    assert a.shape == (4, cfg.hidden_size) and b.shape == (cfg.hidden_size, 4)
    assert "base_model.model.model.embed_tokens.weight" in keys  # modules_to_save (trained embeddings)
    assert "base_model.model.model.layers.1.post_attention_layernorm.weight" in keys
    assert ("base_model.model.lm_head.weight" in keys) == cfg.tie_word_embeddings  # the tied head's copy
    assert (
        ("lm_head" in config["modules_to_save"]) == config.get("ensure_weight_tying", False) == cfg.tie_word_embeddings
    )

    base = transformers.LlamaForCausalLM.from_pretrained(exported["base_dir"], torch_dtype="float32").eval()
    model = peft.PeftModel.from_pretrained(base, exported["tmp"] / "adapter").eval()
    theirs = hf_logits(model, exported["tokens"])
    np.testing.assert_allclose(theirs, exported["ours"], atol=TOL, rtol=0)
    merged = transformers.LlamaForCausalLM.from_pretrained(exported["tmp"] / "merged", torch_dtype="float32").eval()
    np.testing.assert_allclose(theirs, hf_logits(merged, exported["tokens"]), atol=TOL, rtol=0)


@pytest.mark.parametrize("exported", ["tied"], indirect=True)  # only a tied base has a second copy
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # PEFT's note on the untied copies
def test_tied_peft_adapter_loads_as_two_copies(exported):
    """Without PEFT's re-tying (versions that lack ``ensure_weight_tying``), ``embed_tokens`` and ``lm_head``
    are separate copies of the trained embedding; the logits are still ringllama's."""
    import peft
    import transformers

    assert exported["cfg"].tie_word_embeddings
    config = peft.LoraConfig.from_pretrained(exported["tmp"] / "adapter")
    config.ensure_weight_tying = False
    base = transformers.LlamaForCausalLM.from_pretrained(exported["base_dir"], torch_dtype="float32").eval()
    model = peft.PeftModel.from_pretrained(base, exported["tmp"] / "adapter", config=config).eval()
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.data_ptr() != embedding.data_ptr()  # so the head's logits come from the lm_head tensor
    np.testing.assert_allclose(hf_logits(model, exported["tokens"]), exported["ours"], atol=TOL, rtol=0)


def test_export_refuses_mismatched_flags(exported, tmp_path, capsys):
    # A LoRA checkpoint exported without --merge-lora would silently drop the adapters.
    assert main(["flax-to-hf", str(exported["tmp"] / "lora"), str(tmp_path / "x")]) == 2
    assert "--merge-lora" in capsys.readouterr().err and not (tmp_path / "x").exists()
    convert.save_checkpoint(tmp_path / "plain", exported["cfg"], lora_lib.merge(exported["params"], exported["lora"]))
    assert main(["flax-to-hf", str(tmp_path / "plain"), str(tmp_path / "y"), "--merge-lora"]) == 2
    assert "no adapters" in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert main(["flax-to-peft", str(tmp_path / "plain"), str(tmp_path / "z")]) == 2
    assert "not a LoRA checkpoint" in capsys.readouterr().err and not (tmp_path / "z").exists()
