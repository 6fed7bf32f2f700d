"""LoRA: zero-B adapters equal the base, the adapted path equals the merged kernel (float64 numpy),
only trainable leaves get gradients and moments through the real train step, a sharded LoRA step
equals the single-device one, checkpoints hold only the trainable state, and bad configs exit 2."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from engine_fixtures import (
    CFG,
    LOSS_CHUNK,
    TOTAL_STEPS,
    host_params,
    iterator,
    mesh_for,
    num_shards,
    optim_for,
)

from model import Llama
from model import lora as lora_lib
from model.config import ConfigError
from model.params import abstract_params, init_params, logical_axes
from sharding.rules import param_shardings
from train.checkpoint import Checkpointer
from train.stage import build_engine
from train.state import full_params

ALL = tuple(lora_lib.TARGETS)
LORA = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=ALL)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 16))


def _keys(path):
    return tuple(str(getattr(k, "key", k)) for k in path)


@pytest.mark.parametrize("scan", [True, False])
def test_zero_b_equals_base_and_adapted_equals_merged(scan):
    cfg = CFG.replace(scan_layers=scan)
    params = init_params(cfg, jax.random.key(0), lora=LORA)
    base = lora_lib.merge(params, LORA)
    # B = 0 at init: the adapted model is the base model, exactly.
    assert all(not np.any(np.asarray(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
               if _keys(p)[-1] == "lora_b")  # fmt: skip
    assert any(np.any(np.asarray(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
               if _keys(p)[-1] == "lora_a")  # fmt: skip
    ours = Llama(cfg, lora=LORA).apply({"params": params}, TOKENS)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(Llama(cfg).apply({"params": base}, TOKENS)))

    # Nonzero B: x·W + (α/r)·(x·A)·B equals x·(W + (α/r)·A·B) with the merge done in float64 numpy.
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: rng.normal(0, 0.05, x.shape).astype(np.float32) if _keys(p)[-1] == "lora_b" else x, params
    )
    merged = jax.tree.map(jnp.asarray, _merge_f64(params, LORA))
    adapted = np.asarray(Llama(cfg, lora=LORA).apply({"params": params}, TOKENS))
    want = np.asarray(Llama(cfg).apply({"params": merged}, TOKENS))
    assert np.abs(adapted - np.asarray(ours)).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(adapted, want, atol=1e-5, rtol=0)


def _merge_f64(params, lora):
    def walk(node):
        if "lora_a" in node:
            w, a, b = (np.asarray(node[k], np.float64) for k in ("kernel", "lora_a", "lora_b"))
            if w.ndim + 1 == a.ndim - 1 + b.ndim - 1:
                ab = np.stack([np.tensordot(x, y, 1) for x, y in zip(a, b, strict=True)])
            else:
                ab = np.tensordot(a, b, 1)
            return {"kernel": (w + lora.alpha / lora.rank * ab).astype(np.float32)}
        return {k: walk(v) if isinstance(v, dict) else v for k, v in node.items()}

    return walk(params)


def test_adapter_names_and_shardings_follow_their_base_weights():
    names = logical_axes(CFG, LORA)["layers"]
    assert names["attn"]["q_proj"]["lora_a"] == ("layers", "embed", "lora_rank")
    assert names["attn"]["q_proj"]["lora_b"] == ("layers", "lora_rank", "heads", "head_dim")
    assert names["attn"]["o_proj"]["lora_a"] == ("layers", "heads", "head_dim", "lora_rank")
    assert names["mlp"]["down_proj"]["lora_b"] == ("layers", "lora_rank", "embed")
    sh = param_shardings(abstract_params(CFG, LORA), mesh_for("fsdp"))["layers"]
    P = jax.sharding.PartitionSpec
    assert sh["attn"]["q_proj"]["lora_a"].spec == P(None, "fsdp", None)  # A: in (embed) like the kernel's
    assert sh["attn"]["q_proj"]["lora_b"].spec == P(None, None, "tensor", None)  # B: out (heads)
    assert sh["mlp"]["down_proj"]["lora_a"].spec == P(None, "tensor", None)  # A: in (mlp)
    assert sh["mlp"]["down_proj"]["lora_b"].spec == P(None, None, "fsdp")
    shapes = nn.meta.unbox(abstract_params(CFG, LORA))["layers"]["attn"]["o_proj"]
    assert shapes["lora_a"].shape == (CFG.num_layers, CFG.num_heads, CFG.head_dim, 4)


@functools.cache
def _lora_engine(name: str, lora=LORA, donate: bool = True):
    return build_engine(CFG, optim_for(name), mesh_for(name), total_steps=TOTAL_STEPS, loss_chunk=LOSS_CHUNK,
                        lora=lora, donate=donate)  # fmt: skip


def _lora_state(name: str, lora=LORA):
    return _lora_engine(name, lora).init(jax.random.key(7), params=host_params())


@functools.cache
def _lora_steps(name: str, steps: int = 2):
    """(metrics per step, initial state, final state) on mesh ``name``, as numpy."""
    state = _lora_state(name)
    start = jax.device_get(state)
    step = _lora_engine(name).train_step
    it = iterator(num_shards(name))
    metrics = []
    for _ in range(steps):
        state, m = step(state, next(it))
        metrics.append(jax.device_get(m))
    return metrics, start, jax.device_get(state)


def test_only_trainable_leaves_get_gradients_and_moments():
    metrics, start, end = _lora_steps("single")
    assert all(bool(m["finite"]) for m in metrics)
    # The frozen base went through two real steps bitwise unchanged.
    flat0, flat1 = jax.tree_util.tree_flatten_with_path(start.frozen)[0], jax.tree.leaves(end.frozen)
    assert len(flat0) > 0
    for (path, a), b in zip(flat0, flat1, strict=True):
        np.testing.assert_array_equal(a, b, err_msg="/".join(_keys(path)))
    frozen_keys = {_keys(p) for p, _ in flat0}
    assert ("layers", "attn", "q_proj", "kernel") in frozen_keys and ("lm_head", "kernel") in frozen_keys
    # Trainable leaves: adapters (B after step 1, A after step 2, once B ≠ 0), embeddings, norms.
    train0 = dict((_keys(p), x) for p, x in jax.tree_util.tree_flatten_with_path(start.params)[0])
    train1 = dict((_keys(p), x) for p, x in jax.tree_util.tree_flatten_with_path(end.params)[0])
    assert all(lora_lib.is_trainable(k, LORA) for k in train0) and set(train0) == set(train1)
    assert not frozen_keys & set(train0)
    for k in train0:
        assert np.abs(train1[k] - train0[k]).max() > 0, k
    # Adam moments exist for the trainable leaves only: mu mirrors the trainable tree.
    mu = [s for s in jax.tree_util.tree_leaves(end.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
    assert jax.tree.structure(mu[0].mu) == jax.tree.structure(end.params)
    full = sum(int(np.size(x)) for x in jax.tree.leaves(full_params(end)))
    assert sum(int(np.size(x)) for x in jax.tree.leaves(mu[0].mu)) < full / 2


def test_frozen_base_in_bf16_and_no_embeddings_or_norms():
    lora = lora_lib.LoraConfig(rank=2, targets=("q", "v"), train_embeddings=False, train_norms=False,
                               base_dtype="bfloat16")  # fmt: skip
    state = _lora_state("single", lora)
    assert {str(x.dtype) for x in jax.tree.leaves(state.frozen)} == {"bfloat16"}
    assert {str(x.dtype) for x in jax.tree.leaves(state.params)} == {"float32"}
    leaves = {_keys(p)[-2:] for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    assert leaves == {("q_proj", "lora_a"), ("q_proj", "lora_b"), ("v_proj", "lora_a"), ("v_proj", "lora_b")}
    # Merged params: the base (cast back to param_dtype) plus zero updates.
    merged = jax.device_get(_lora_engine("single", lora).merged(state))
    base = host_params()
    np.testing.assert_array_equal(merged["embed_tokens"]["embedding"],
                                  np.asarray(jnp.asarray(base["embed_tokens"]["embedding"]).astype(jnp.bfloat16)
                                             .astype(jnp.float32)))  # fmt: skip


def test_sharded_lora_step_equals_single_device():
    """fsdp=2 × tensor=2 × sequence=2 ring (2 micro-batches) against one device, over two steps."""
    ref_m, ref_start, ref_end = _lora_steps("single")
    m, start, end = _lora_steps("fsdp")
    for a, b in zip(jax.tree.leaves(start.params), jax.tree.leaves(ref_start.params), strict=True):
        np.testing.assert_array_equal(a, b)  # the same adapters from the same key on either mesh
    for a, b in zip(m, ref_m, strict=True):
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5)
    assert _rel_err(end.params, ref_end.params) <= 1e-5
    assert _rel_err(end.opt_state, ref_end.opt_state) <= 1e-5
    for a, b in zip(jax.tree.leaves(end.frozen), jax.tree.leaves(start.frozen), strict=True):
        np.testing.assert_array_equal(a, b)


def _rel_err(a, b) -> float:
    """Largest leaf-wise ‖a − b‖ / ‖b‖; a zero leaf of ``b`` must be matched exactly (inf otherwise)."""
    errs = []
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        diff, ref = np.linalg.norm(x - y), np.linalg.norm(y)
        errs.append(diff / ref if ref > 0 else (0.0 if diff == 0 else np.inf))
    return max(errs)


def test_checkpoint_holds_only_the_trainable_state_and_resumes(tmp_path):
    engine = _lora_engine("single", LORA, donate=False)
    step = engine.train_step
    it = iterator(1, seed=3)
    batches = [next(it) for _ in range(3)]
    state, _ = step(_lora_state("single"), batches[0])
    with Checkpointer(tmp_path / "ck", async_save=False) as ck:
        ck.save(1, state, {"note": "lora"})
        restored, _ = ck.restore(1, engine.restore_target)
    assert restored.frozen is None
    stored = sum(f.stat().st_size for f in (tmp_path / "ck").rglob("*") if f.is_file())
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(jax.device_get(state.frozen)))
    assert stored < base_bytes  # the base is not in the checkpoint
    restored = restored.replace(frozen=engine.frozen(base=host_params()))
    a, b = state, restored
    for batch in batches[1:]:
        (a, ma), (b, mb) = step(a, batch), step(b, batch)
        assert float(ma["loss"]) == float(mb["loss"])
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "override, phrase",
    [
        ("lora.rank=0", "lora.rank must be an int ≥ 1"),
        ("lora.targets=[q, qkv]", "unknown lora target 'qkv'"),
        ("lora.dropout=0.1", "lora.dropout 0.1 is not supported"),
    ],
)
def test_bad_lora_config_is_one_sentence_exit_2(override, phrase, tmp_path, capsys):
    from train.cli import main

    with pytest.raises(ConfigError, match="lora"):
        lora_lib.LoraConfig(rank=0)
    code = main(["--set", "stages=[{seq_len: 64, steps: 1}]", "--set", override, "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and phrase in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.fixture
def compile_cache(tmp_path):
    """A persistent XLA cache: the three runs below compile the same programs."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.reset_cache()
    yield
    for n, v in old.items():
        jax.config.update(n, v)
    cc.reset_cache()


@pytest.mark.slow  # two training runs and an export: ~40 s on CPU
def test_runner_lora_run_resumes_on_its_base_and_exports(tmp_path, compile_cache):
    """Two stages on an fsdp=2 × tensor=2 × sequence=2 mesh from an --init-from base; a stop + ``--resume --init-from`` run repeats
    the losses bit for bit; the run writes merged ``final/``, ``lora/`` and ``peft/``."""
    import convert
    from convert.peft import load_lora_checkpoint
    from train.config import from_dict
    from train.curriculum import run
    from train.metrics import read_metrics

    cfg_m = CFG.replace(hidden_size=32, intermediate_size=64, head_dim=8, max_position_embeddings=32)
    base_dir = tmp_path / "base"
    base = jax.device_get(init_params(cfg_m, jax.random.key(5)))
    convert.save_checkpoint(base_dir, cfg_m, base)
    raw = {
        "model": {"preset": "tiny"},
        "data": {"sources": [{"kind": "synthetic", "task": "prose"}]},
        "mesh": {"data": 1, "fsdp": 2, "tensor": 2, "sequence": 2},
        "optim": {"lr": 1e-2, "warmup_steps": 1},
        "stages": [
            {"name": "short", "seq_len": 32, "steps": 2, "batch_size": 4},
            {"name": "long", "seq_len": 64, "steps": 2, "batch_size": 2, "theta_rule": "critical"},
        ],
        "lora": {"rank": 2, "alpha": 4, "targets": ["q", "v", "o"]},
        "checkpoint": {"every": 1, "keep": 5, "async_save": False},
        "eval": {"heldout_batches": 1},
        "loss_chunk": 32,
        "progress": False,
        "tensorboard": False,
    }
    cfg = from_dict(raw)
    quiet = lambda *a, **k: None  # noqa: E731
    losses = lambda d: [r["loss"] for r in read_metrics(str(d / "metrics.jsonl")) if r["kind"] == "train"]  # noqa: E731
    run(cfg, run_dir=str(tmp_path / "a"), init_from=str(base_dir), say=quiet)
    run(cfg, run_dir=str(tmp_path / "b"), init_from=str(base_dir), stop_after=3, say=quiet)
    with pytest.raises(ConfigError, match="resume it with --init-from"):  # not onto the seed's random base
        run(cfg, run_dir=str(tmp_path / "b"), resume=True, say=quiet)
    run(cfg, run_dir=str(tmp_path / "b"), init_from=str(base_dir), resume=True, say=quiet)
    assert len(losses(tmp_path / "a")) == 4 and losses(tmp_path / "b") == losses(tmp_path / "a")

    # The checkpoint holds adapters, norms and embeddings (and their Adam moments), never a frozen base kernel.
    # (Its bytes are no test at this size: the trained embedding and its two moments outweigh the tiny base.)
    meta = ocp.StandardCheckpointer().metadata(str(tmp_path / "a" / "checkpoints" / "4" / "state"))
    stored = ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
              for path, _ in jax.tree_util.tree_flatten_with_path(meta.item_metadata.tree)[0]]  # fmt: skip
    params = [p for p in stored if p.startswith("params/")]
    assert params and all(p.rsplit("/", 1)[1] in ("lora_a", "lora_b", "scale", "embedding") for p in params), params
    assert any(p.endswith("lora_a") for p in params) and not any(p.startswith("frozen/") for p in stored)
    _, lora, params, base_name = load_lora_checkpoint(tmp_path / "a" / "lora")
    assert lora == cfg.lora and base_name == str(base_dir)
    with pytest.raises(convert.ConversionError, match="is a LoRA checkpoint"):  # not a hybrid without adapters
        convert.load_model(tmp_path / "a" / "lora")
    np.testing.assert_array_equal(
        params["layers"]["attn"]["k_proj"]["kernel"], base["layers"]["attn"]["k_proj"]["kernel"]
    )
    assert np.abs(params["layers"]["attn"]["q_proj"]["lora_b"]).max() > 0  # trained
    _, final = convert.load_checkpoint(tmp_path / "a" / "final")
    merged = lora_lib.merge(params, lora)
    np.testing.assert_allclose(final["layers"]["attn"]["q_proj"]["kernel"], merged["layers"]["attn"]["q_proj"]["kernel"],
                               atol=1e-6)  # fmt: skip
    assert (tmp_path / "a" / "peft" / "adapter_model.safetensors").is_file()


def test_runner_lora_branch_after_resume_starts_from_its_source(tmp_path, compile_cache):
    """``from:`` + ``--resume`` on a LoRA run (the branch source is restored from its stage-end checkpoint
    with the LoRA layout and its frozen base re-attached): the resumed run repeats the uninterrupted
    losses, and two identical branches from one stage train identically, so each started from that stage."""
    from train.config import from_dict
    from train.curriculum import run
    from train.metrics import read_metrics

    s1 = {"name": "s1", "seq_len": 32, "steps": 2, "batch_size": 4}
    raw = {
        "model": {"preset": "tiny", "hidden_size": 32, "intermediate_size": 64, "head_dim": 8,
                  "max_position_embeddings": 32},
        "data": {"sources": [{"kind": "synthetic", "task": "prose"}]},
        "mesh": {"data": 1, "fsdp": 2, "tensor": 2, "sequence": 2},
        "optim": {"lr": 1e-2, "warmup_steps": 1},
        "stages": [s1, {**s1, "name": "a", "steps": 1, "from": "s1"}, {**s1, "name": "b", "steps": 1, "from": "s1"}],
        "lora": {"rank": 2, "alpha": 4, "targets": ["q", "v"]},
        "checkpoint": {"every": 0, "keep": 5, "async_save": False},
        "eval": {"heldout_batches": 0},
        "loss_chunk": 32,
        "progress": False,
        "tensorboard": False,
    }  # fmt: skip
    cfg = from_dict(raw)
    quiet = lambda *a, **k: None  # noqa: E731

    def losses(d):
        return [(r["stage"], r["loss"]) for r in read_metrics(str(d / "metrics.jsonl")) if r["kind"] == "train"]

    run(cfg, run_dir=str(tmp_path / "a"), say=quiet)
    run(cfg, run_dir=str(tmp_path / "b"), stop_after=3, say=quiet)  # stops at the end of branch a
    run(cfg, run_dir=str(tmp_path / "b"), resume=True, say=quiet)  # b restores s1's stage-end checkpoint
    straight = losses(tmp_path / "a")
    assert [name for name, _ in straight] == ["s1", "s1", "a", "b"]
    assert straight[2][1] == straight[3][1]  # a and b: the same start, data and config
    assert losses(tmp_path / "b") == straight


@pytest.mark.parametrize(
    "lora",
    [lora_lib.LoraConfig(rank=8), lora_lib.LoraConfig(rank=8, train_embeddings=False, train_norms=False,
                                                      base_dtype="bfloat16")],
    ids=["longlora", "adapters-bf16-base"],
)  # fmt: skip
def test_planner_counts_lora_like_xla(lora):
    """The planner's LoRA state (params + moments + batch) within 5% of the compiled step's arguments, the total
    within 25% (the tolerances of tests/test_planner.py), and far below the full fine-tune's state."""
    from sharding.mesh import MeshConfig, make_mesh
    from sharding.planner import plan_memory
    from sharding.rules import batch_sharding
    from train.optim import OptimConfig
    from train.step import BATCH_KEYS

    cfg = CFG.replace(remat_policy="full")
    mesh_cfg = MeshConfig(data=1, fsdp=4, tensor=2, sequence=1)
    mesh = make_mesh(mesh_cfg)
    optim, (b, t) = OptimConfig(), (8, 128)
    engine = build_engine(cfg, optim, mesh, total_steps=4, loss_chunk=64, lora=lora)
    step, state = engine.train_step, engine.abstract
    batch = {k: jax.ShapeDtypeStruct((b, t), np.float32 if k == "loss_mask" else np.int32,
                                     sharding=batch_sharding(mesh, (b, t))) for k in BATCH_KEYS}  # fmt: skip
    mem = step.jitted(batch).lower(state, batch).compile().memory_analysis()
    plan = plan_memory(cfg, abstract_params(cfg, lora), t, b, mesh_cfg, "full", loss_chunk=64, lora=lora)
    assert np.isclose(plan.state, mem.argument_size_in_bytes, rtol=0.05)
    xla_total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    assert np.isclose(plan.total, xla_total, rtol=0.25)
    full = plan_memory(cfg, abstract_params(cfg), t, b, mesh_cfg, "full", loss_chunk=64)
    assert plan.optimizer < full.optimizer / 2 and plan.grads < full.grads / 2


def test_longlora_recipe_config_fits_one_node_where_full_fine_tuning_does_not():
    from sharding.planner import plan_memory
    from train.config import load_config, validate

    cfg = load_config("configs/llama3-8b-128k-lora.yaml")
    (plan,) = validate(cfg, num_devices=8)
    assert cfg.lora.targets == ("q", "k", "v", "o") and cfg.lora.train_embeddings and cfg.lora.train_norms
    assert plan.stage.seq_len == 131072 and plan.model.rope.theta > 5e7
    args = dict(remat=plan.model.remat_policy, loss_chunk=cfg.loss_chunk)
    lora = plan_memory(
        plan.model,
        abstract_params(plan.model, cfg.lora),
        plan.stage.seq_len,
        plan.stage.batch_size,
        plan.mesh,
        lora=cfg.lora,
        **args,
    )
    full = plan_memory(
        plan.model, abstract_params(plan.model), plan.stage.seq_len, plan.stage.batch_size, plan.mesh, **args
    )
    assert lora.fits(80 * 10**9) and not full.fits(80 * 10**9)
