"""convert/: HF ⇄ ringllama round trips, logits against transformers, orbax checkpoints, Meta import.

Every model here is a tiny `transformers.LlamaForCausalLM` built locally and saved with
``save_pretrained``; nothing comes from a hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_dtypes  # noqa: F401  (bf16 through safetensors' numpy reader)
import numpy as np
import pytest
import torch
import transformers
from hf_fixtures import hf_logits, hf_state_dict, tiny_hf_model
from jax.sharding import NamedSharding, PartitionSpec
from safetensors import safe_open
from safetensors.numpy import save_file

import convert
from convert import cli, names
from model import Llama, LlamaConfig
from sharding import MeshConfig, make_mesh

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 9))


def ringllama_logits(cfg, params, tokens) -> np.ndarray:
    # One jit-compiled program: much cheaper on CPU than eager op-by-op dispatch.
    return np.asarray(jax.jit(Llama(cfg).apply)({"params": params}, tokens))


def read_dir(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a single-file or sharded HF directory, as stored."""
    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "np") as f:
            for name in f.keys():
                assert name not in out
                out[name] = f.get_tensor(name)
    return out


def assert_bit_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name].view(np.uint8), b[name].view(np.uint8)), name


def rope_of(cfg) -> dict:
    # "type" is v4's alias of "rope_type", which transformers v5 carries over from `rope_scaling`.
    return {k: v for k, v in cfg.rope_parameters.items() if v is not None and k != "type"}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name → (transformers model, saved directory)."""
    root = tmp_path_factory.mktemp("hf")
    made = {}
    specs = {
        # untied GQA, llama3 rope, one file, fp32
        "llama3": (dict(rope_parameters=LLAMA3_ROPE, max_position_embeddings=16384), "fp32", None),
        # tied MHA, yarn rope, head_dim != hidden / heads, sharded, bf16
        "tied": (
            dict(tie_word_embeddings=True, num_key_value_heads=4, head_dim=8, rope_parameters=YARN_ROPE),
            "bf16",
            "20KB",
        ),
    }
    for name, (overrides, dtype, shard) in specs.items():
        model = tiny_hf_model(seed=len(made), **overrides)
        saved = model.to(torch.bfloat16) if dtype == "bf16" else model
        kwargs = {"max_shard_size": shard} if shard else {}
        saved.save_pretrained(root / name, **kwargs)
        made[name] = (model.float(), root / name)
    assert (root / "tied" / "model.safetensors.index.json").is_file()
    assert (root / "llama3" / "model.safetensors").is_file()
    return made


@pytest.mark.parametrize("name,shard_size", [("llama3", "40KB"), ("tied", "5GB")])
def test_hf_round_trip_through_cli_is_bit_identical(hf_models, tmp_path, name, shard_size):
    model, src = hf_models[name]
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert cli.main(["hf-to-flax", str(src), str(ckpt)]) == 0
    assert cli.main(["flax-to-hf", str(ckpt), str(out), "--max-shard-size", shard_size]) == 0

    assert_bit_identical(read_dir(src), read_dir(out))
    sharded = (out / "model.safetensors.index.json").is_file()
    assert sharded == (shard_size == "40KB")
    if sharded:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*-of-*.safetensors")}
        assert index["metadata"]["total_size"] == sum(a.nbytes for a in read_dir(out).values())
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), "np") as f:
            assert f.metadata() == {"format": "pt"}
    assert ("lm_head.weight" in read_dir(out)) == (not model.config.tie_word_embeddings)

    # transformers reads the written config with the same rope settings, and the same model.
    hf_cfg = transformers.AutoConfig.from_pretrained(out)
    assert rope_of(hf_cfg) == rope_of(model.config)
    assert hf_cfg.tie_word_embeddings == model.config.tie_word_embeddings
    assert hf_cfg.head_dim == model.config.head_dim
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_array_equal(
        hf_logits(reloaded, TOKENS), hf_logits(transformers.LlamaForCausalLM.from_pretrained(src).float(), TOKENS)
    )


@pytest.mark.parametrize("name", ["llama3", "tied"])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_name_map_from_abstract_params_matches_transformers_state_dict(hf_models, name, scan_layers):
    """The derived map names exactly the tensors transformers has, with its shapes, in either layout."""
    model, path = hf_models[name]
    cfg = LlamaConfig.from_hf(path, scan_layers=scan_layers)
    state = {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if not (k == "lm_head.weight" and cfg.tie_word_embeddings)
    }
    expected = names.expected_tensors(cfg)
    assert sorted(expected) == sorted(state)
    for hf_name, (rule, _) in expected.items():
        assert rule.hf_shape(cfg) == state[hf_name], hf_name
    # Every parameter of the model is covered once (an unmapped one would be silently dropped on export).
    covered = {(("layers",) if scan_layers else (f"layers_{layer}",)) + rule.path if layer is not None else rule.path
               for rule, layer in expected.values()}  # fmt: skip
    assert covered == set(names.param_paths(cfg))


def test_loaded_logits_match_transformers(hf_models):
    for name, scan in (("llama3", True), ("tied", False)):
        model, src = hf_models[name]
        cfg, params = convert.load_hf(src, "float32", scan_layers=scan)
        assert cfg.scan_layers == scan and cfg.param_dtype == "float32"
        assert ("layers" in params) == scan and ("lm_head" in params) == (name != "tied")
        # The bf16 checkpoint's reference is the bf16-rounded model evaluated in fp32.
        ref_model = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        got = ringllama_logits(cfg, params, TOKENS)
        assert np.abs(got - hf_logits(ref_model, TOKENS)).max() <= 1e-4
    del model


def test_load_hf_keeps_stored_dtype_or_casts(hf_models, tmp_path):
    _, src = hf_models["tied"]
    cfg, params = convert.load_hf(src)
    assert cfg.param_dtype == "bfloat16"
    assert all(x.dtype == np.dtype("bfloat16") for x in jax.tree.leaves(params))
    cfg32, params32 = convert.load_hf(src, "float32")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params32), strict=True):
        np.testing.assert_array_equal(a.astype(np.float32), b)  # bf16 -> fp32 is exact
    # ... and exporting the fp32 params as bf16 gives back the stored bits.
    convert.save_hf(cfg32, params32, tmp_path / "out", dtype="bfloat16")
    assert_bit_identical(read_dir(src), read_dir(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def _rewrite(file: Path, edit) -> None:
    with safe_open(str(file), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(edit(tensors), str(file), metadata={"format": "pt"})


def test_legacy_inv_freq_is_skipped_and_tied_head_checked(hf_models, tmp_path):
    model, _ = hf_models["llama3"]
    tied = tiny_hf_model(seed=3, tie_word_embeddings=True)
    tied.save_pretrained(tmp_path / "t")
    _, clean = convert.load_hf(tmp_path / "t")

    def add(tensors):
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
        return tensors

    _rewrite(tmp_path / "t" / "model.safetensors", add)
    cfg, params = convert.load_hf(tmp_path / "t")
    assert "lm_head" not in params
    jax.tree.map(np.testing.assert_array_equal, params, clean)

    def differ(tensors):
        tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1.0
        return tensors

    _rewrite(tmp_path / "t" / "model.safetensors", differ)
    with pytest.raises(convert.ConversionError, match="lm_head.weight differs from the embedding"):
        convert.load_hf(tmp_path / "t")
    del model, cfg


def test_checkpoint_round_trip_and_load_model(hf_models, tmp_path):
    _, src = hf_models["llama3"]
    cfg, params = convert.load_hf(src)
    ckpt = convert.save_checkpoint(tmp_path / "ck", cfg, params, side_files_from=src)
    assert convert.is_ringllama_checkpoint(ckpt) and not convert.is_hf_checkpoint(ckpt)
    assert (ckpt / "generation_config.json").is_file()

    cfg2, host = convert.load_checkpoint(ckpt)
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, host)

    mesh = make_mesh(MeshConfig(fsdp=8))
    sharded = NamedSharding(mesh, PartitionSpec())
    cfg3, placed = convert.load_checkpoint(ckpt, sharded, dtype="bfloat16")
    assert cfg3.param_dtype == "bfloat16"
    leaf = placed["layers"]["attn"]["q_proj"]["kernel"]
    assert isinstance(leaf, jax.Array) and leaf.sharding == sharded and leaf.dtype == np.dtype("bfloat16")
    # Saving jax arrays (the training path) goes through orbax's standard handlers.
    convert.save_checkpoint(tmp_path / "ck16", cfg3, placed)
    cfg16, host16 = convert.load_checkpoint(tmp_path / "ck16")
    assert cfg16 == cfg3
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(a.dtype)), host16, params)

    # load_model on both kinds of directory, with a layout change on the ringllama one.
    cfg4, per_layer = convert.load_model(ckpt, scan_layers=False)
    assert not cfg4.scan_layers and "layers_1" in per_layer
    cfg5, from_hf = convert.load_model(src, scan_layers=False)
    assert cfg5 == cfg4
    jax.tree.map(np.testing.assert_array_equal, per_layer, from_hf)
    convert.save_hf(cfg4, per_layer, tmp_path / "hf_per_layer")  # export from the layers_i layout
    assert_bit_identical(read_dir(src), read_dir(tmp_path / "hf_per_layer"))
    back_cfg, back = convert.relayout(per_layer, cfg4, True)
    assert back_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_save_hf_failure_leaves_nothing(hf_models, tmp_path, monkeypatch):
    _, src = hf_models["llama3"]
    cfg, params = convert.load_hf(src)
    import convert.hf as hf

    calls = []
    real = hf.flax_to_hf

    def flaky(*args):
        calls.append(1)
        if len(calls) == 5:
            raise convert.ConversionError("simulated failure")
        return real(*args)

    monkeypatch.setattr(hf, "flax_to_hf", flaky)
    with pytest.raises(convert.ConversionError, match="simulated"):
        convert.save_hf(cfg, params, tmp_path / "out", max_shard_size="20KB")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ Meta
def _write_meta(model, root: Path, shards: int, params_json: dict) -> None:
    """Write ``model`` the way Meta ships it: interleaved q/k, Meta names, model-parallel shards."""
    from convert.meta import META_TO_HF, half_to_interleaved

    c = model.config
    hf_to_meta = {}
    for meta, hf in META_TO_HF.items():
        for i in range(c.num_hidden_layers) if "{i}" in meta else [None]:
            hf_to_meta[hf.format(i=i)] = meta.format(i=i)
    pieces: list[dict] = [{} for _ in range(shards)]
    for name, value in hf_state_dict(model).items():
        if name.endswith("q_proj.weight"):
            value = half_to_interleaved(value, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            value = half_to_interleaved(value, c.num_key_value_heads)
        meta = hf_to_meta[name]
        # Meta's model parallelism: column-parallel (rows) split, row-parallel (wo, w2) by columns, norms copied.
        axis = None if "norm" in meta else 1 if (".wo." in meta or ".w2." in meta) else 0
        for k in range(shards):
            part = value if axis is None else np.split(value, shards, axis=axis)[k]
            pieces[k][meta] = torch.from_numpy(np.ascontiguousarray(part))
    root.mkdir()
    for k, piece in enumerate(pieces):
        torch.save(piece, root / f"consolidated.{k:02d}.pth")
    (root / "params.json").write_text(json.dumps(params_json))


def test_meta_import_matches_hf_logits(tmp_path):
    model = tiny_hf_model(seed=5, rope_parameters=LLAMA3_ROPE, max_position_embeddings=131072)
    params_json = {
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "vocab_size": 128,
        "multiple_of": 32,
        "ffn_dim_multiplier": 0.55,  # int(0.55 * int(2 * 4 * 64 / 3)) = 93 -> 96 at multiple_of 32
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
    }
    _write_meta(model, tmp_path / "meta1", 1, params_json)
    _write_meta(model, tmp_path / "meta2", 2, params_json)
    assert cli.main(["meta-to-flax", str(tmp_path / "meta1"), str(tmp_path / "ck")]) == 0
    cfg, params = convert.load_model(tmp_path / "ck")
    assert cfg.intermediate_size == 96 and cfg.rope.rope_type == "llama3" and cfg.rope.factor == 8.0
    assert cfg.max_position_embeddings == 131072
    got = ringllama_logits(cfg, params, TOKENS)
    assert np.abs(got - hf_logits(model, TOKENS)).max() <= 1e-4

    cfg2, params2 = convert.load_meta(tmp_path / "meta2")  # two model-parallel shards
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    assert isinstance(cfg, LlamaConfig)
