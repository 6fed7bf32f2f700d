"""PoSE: the position pattern against the draw, packed documents, the iterator (layouts, hosts,
resume), the loss through the ring train step against explicit positions through the model, θ
rules at the target length, and bad pose configs."""

import functools

import jax
import numpy as np
import pytest
import yaml
from engine_fixtures import BATCH, CFG, DATA, SEQ, engine_for, host_params, persistent_compile_cache, step_for

import model
from attention.layout import from_layout
from convert.checkpoint import read_config
from model.config import ConfigError
from sharding.mesh import make_mesh
from train import cli
from train.config import dump_config, from_dict, validate
from train.curriculum import run
from train.data import make_iterator
from train.metrics import read_metrics
from train.packing import pack_documents
from train.pose import PoseConfig, apply_pose, chunk_positions, draw_chunks, draw_pose_positions, pose_rng
from train.stage import build_engine, data_seed

POSE = PoseConfig(target_length=512, chunks=2)


def _positions_by_hand(starts, skips, segment_ids, positions):
    """The spec, one token at a time: row position c + u[chunk(c)], each document piece re-based to 0."""
    out = positions.copy()
    for r in range(segment_ids.shape[0]):
        row_pos = []
        for c in range(segment_ids.shape[1]):
            chunk = max(i for i in range(len(starts[r])) if starts[r][i] <= c)
            row_pos.append(c + skips[r][chunk])
        first = 0
        for c in range(segment_ids.shape[1]):
            if c == 0 or segment_ids[r, c] != segment_ids[r, c - 1]:
                first = c
            if segment_ids[r, c] > 0:
                out[r, c] = row_pos[c] - row_pos[first]
    return out


@pytest.mark.parametrize(("seq_len", "target", "chunks"), [(16, 20, 2), (64, 1024, 2), (32, 100, 4), (8, 8, 3)])
def test_positions_follow_the_draw_and_span_the_target(seq_len, target, chunks):
    rows = 400
    starts, skips = draw_chunks(pose_rng(7, 0), rows, seq_len, target, chunks)
    pos = chunk_positions(starts, skips, seq_len)
    assert pos.dtype == np.int32 and pos.shape == (rows, seq_len)
    assert (starts[:, 0] == 0).all() and (np.diff(starts, axis=1) > 0).all() and (starts < seq_len).all()
    assert (skips[:, 0] == 0).all() and (np.diff(skips, axis=1) >= 0).all() and (skips <= target - seq_len).all()
    assert (pos[:, 0] == 0).all() and (pos[:, -1] < target).all()
    step = np.diff(pos, axis=1)
    assert (step >= 1).all()  # strictly increasing inside the window
    for r in range(rows):  # the jumps sit exactly at the drawn chunk starts, by the drawn skip differences
        want = np.ones(seq_len - 1, np.int64)
        want[starts[r, 1:] - 1] += np.diff(skips[r])
        np.testing.assert_array_equal(step[r], want)
    if target - seq_len > 100:  # a wide range: 400 draws come close to its end
        assert pos[:, -1].max() > 0.95 * target
    elif target > seq_len:  # a narrow range: the draws reach its ends, so the positions span [0, T)
        assert pos[:, -1].max() == target - 1 and skips[:, 1].min() == 0
        assert set(starts[:, 1:].ravel().tolist()) == set(range(1, seq_len))  # every boundary is drawn
    else:  # T = L: no room to skip, plain positions
        np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(seq_len), pos.shape))


def test_draw_is_deterministic_from_seed_and_batch_index():
    def draw(seed, index):
        return draw_pose_positions(pose_rng(seed, index), 64, 4096, 3, rows=4)

    np.testing.assert_array_equal(draw(1, 5), draw(1, 5))
    assert not np.array_equal(draw(1, 5), draw(1, 6)) and not np.array_equal(draw(1, 5), draw(2, 5))


def test_packed_documents_keep_their_own_origin_and_the_row_distances():
    docs = [np.arange(1, 11), np.arange(20, 70), np.arange(100, 105), np.arange(200, 230)]
    batch = pack_documents(docs, 32, mode="split")  # doc 2 continues into row 1, the last row is padded
    starts, skips = draw_chunks(pose_rng(3, 0), len(batch["tokens"]), 32, 300, 3)
    out = apply_pose(batch, chunk_positions(starts, skips, 32))
    want = _positions_by_hand(starts, skips, batch["segment_ids"], batch["positions"])
    np.testing.assert_array_equal(out["positions"], want)
    for key in ("tokens", "targets", "segment_ids", "loss_mask"):
        np.testing.assert_array_equal(out[key], batch[key])
    pad = batch["segment_ids"] == 0
    assert pad.any() and (out["positions"][pad] == batch["positions"][pad]).all()
    assert (out["positions"] < 300).all()
    for r in range(len(out["tokens"])):
        for s in np.unique(batch["segment_ids"][r][batch["segment_ids"][r] > 0]):
            p = out["positions"][r][batch["segment_ids"][r] == s]
            assert p[0] == 0 and (np.diff(p) >= 1).all()


def test_iterator_redraws_only_positions_in_every_layout_and_host_slice():
    plain = make_iterator(DATA, SEQ, BATCH, 0)
    pose = make_iterator(DATA, SEQ, BATCH, 0, pose=POSE)
    zig = make_iterator(DATA, SEQ, BATCH, 0, pose=POSE, layout="zigzag", num_shards=4)
    striped = make_iterator(DATA, SEQ, BATCH, 0, pose=POSE, layout="striped", num_shards=4)
    hosts = [make_iterator(DATA, SEQ, BATCH, 0, pose=POSE, process_index=p, process_count=2) for p in (0, 1)]
    for b in range(3):
        ref, got, z, st = next(plain), next(pose), next(zig), next(striped)
        halves = [next(h) for h in hosts]
        want = apply_pose(ref, draw_pose_positions(pose_rng(0, b), SEQ, POSE.target_length, POSE.chunks, BATCH))
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
            np.testing.assert_array_equal(from_layout(z[key], 4, "zigzag"), want[key])
            np.testing.assert_array_equal(from_layout(st[key], 4, "striped"), want[key])
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), want[key])
        assert not np.array_equal(got["positions"], ref["positions"]) and got["positions"].max() < POSE.target_length


def test_restored_iterator_yields_the_same_pose_batches():
    it = make_iterator(DATA, SEQ, BATCH, 4, pose=POSE, layout="zigzag", num_shards=4)
    for _ in range(3):
        next(it)
    saved = it.state()
    expected = [next(it) for _ in range(3)]
    resumed = make_iterator(DATA, SEQ, BATCH, 4, pose=POSE, layout="zigzag", num_shards=4)
    resumed.restore(saved)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    # and the draws really move on from batch to batch
    assert not np.array_equal(expected[0]["positions"], expected[1]["positions"])


@functools.cache
def _sharp_params():
    """The shared initial params with attention and head scaled up, so that positions move the loss.

    At the 0.02-std init the attention is near uniform and the loss barely depends on positions
    (relative change ~5e-6 between PoSE and packed positions, below the comparison's tolerance).
    """

    def scale(path, x):
        names = [getattr(k, "key", "") for k in path]
        if any(n in ("q_proj", "k_proj", "v_proj", "o_proj") for n in names):
            return x * 10.0
        return x * 5.0 if names[0] in ("embed_tokens", "lm_head") else x

    return jax.tree_util.tree_map_with_path(scale, host_params())


def _loss_by_hand(batch):
    """Mean weighted next-token NLL with the model's logits at explicit positions, in float64 numpy."""
    logits = jax.jit(model.Llama(CFG.replace(attention_impl="reference")).apply)(
        {"params": _sharp_params()}, batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"]
    )
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None].astype(np.int64), axis=-1)[..., 0]
    w = batch["loss_mask"].astype(np.float64)
    return float((nll * w).sum() / w.sum())


def test_pose_loss_through_the_ring_step_equals_explicit_positions():
    """A zigzag PoSE batch through the data=2 × sequence=4 ring train step = the model at hand-built positions."""
    it = make_iterator(DATA, SEQ, BATCH, 0, pose=POSE, layout="zigzag", num_shards=4)
    batch = next(it)
    state = engine_for("ring").init(jax.random.key(0), params=_sharp_params())
    _, metrics = step_for("ring")(state, batch)
    plain = next(make_iterator(DATA, SEQ, BATCH, 0))
    starts, skips = draw_chunks(pose_rng(0, 0), BATCH, SEQ, POSE.target_length, POSE.chunks)
    by_hand = dict(plain, positions=_positions_by_hand(starts, skips, plain["segment_ids"], plain["positions"]))
    want = _loss_by_hand(by_hand)
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=2e-5)
    # The positions matter: the same tokens at their packed positions give another loss.
    assert abs(_loss_by_hand(plain) - want) > 1e-3 * want


BASE = {
    "model": {"preset": "tiny", "max_position_embeddings": 64, "rope": {"theta": 1000.0}},
    "mesh": {"data": 2, "fsdp": 1, "sequence": 4},
    "data": {"sources": [{"kind": "synthetic", "task": "prose"}]},
    "stages": [
        {"seq_len": 64, "steps": 2, "batch_size": 4},
        {"seq_len": 64, "steps": 2, "batch_size": 4, "theta_rule": "critical", "pose": {"target_length": 512}},
        {"seq_len": 128, "steps": 2, "batch_size": 2, "theta_rule": "ntk"},
    ],
}


def test_theta_rules_and_max_positions_use_the_target_length():
    cfg = from_dict(BASE)
    assert from_dict(yaml.safe_load(dump_config(cfg))) == cfg  # the run dir's config.yaml reloads the pose
    plans = validate(cfg, num_devices=8)
    assert plans[1].stage.pose == PoseConfig(target_length=512, chunks=2)
    crit = model.theta_for_length(512, 1000.0, 64, head_dim=CFG.head_dim, rule="critical")
    assert plans[1].model.rope.theta == pytest.approx(crit, rel=1e-12) and crit > 1000.0
    assert plans[1].model.max_position_embeddings == 512  # the config written after the PoSE stage
    # The next stage's rule starts from the PoSE stage's (θ, T), and max positions never shrink.
    ntk = model.theta_for_length(128, crit, 512, head_dim=CFG.head_dim, rule="ntk")
    assert plans[2].model.rope.theta == pytest.approx(ntk, rel=1e-12)
    assert plans[2].model.max_position_embeddings == 512
    same = from_dict(BASE, ["stages.1.pose.target_length=64"])  # T = L: as if no PoSE
    assert validate(same, num_devices=8)[1].model.rope.theta == pytest.approx(1000.0, rel=1e-12)


@pytest.mark.parametrize(
    ("override", "phrase"),
    [
        ("stages.1.pose.target_length=32", "stages.1.pose.target_length 32 is below the stage's seq_len 64"),
        ("stages.1.pose.chunks=0", "stages.1.pose.chunks must be ≥ 1, got 0"),
        ("stages.1.pose.chunks=65", "stages.1.pose.chunks 65 exceeds the seq_len 64"),
        ("stages.1.pose={chunks: 2}", "stages.1.pose is incomplete"),
        ("stages.1.pose.chunk=2", "unknown config field stages.1.pose.chunk"),
    ],
)
def test_bad_pose_config_fails_with_one_sentence(override, phrase):
    with pytest.raises(ConfigError) as info:
        validate(from_dict(BASE, [override]), num_devices=8)
    assert phrase in str(info.value) and "\n" not in str(info.value)


def test_cli_exits_2_on_a_bad_pose_config_and_leaves_no_run_dir(tmp_path, capsys):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["stages"][1]["pose"] = {"target_length": 16, "chunks": 2}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    assert cli.main(["--config", str(path), "--run-dir", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "target_length 16 is below" in err and "\n" not in err
    assert not run_dir.exists()


@pytest.fixture
def compile_cache(tmp_path_factory):
    """A persistent XLA cache for one test: the by-hand step below then reuses the runner's compile."""
    with persistent_compile_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


def test_curriculum_trains_on_pose_batches_and_writes_the_target_length(tmp_path, compile_cache):
    """One PoSE stage through `train.run`: its first loss is the step's loss on the PoSE batch, and the
    final model's config carries max positions T and the θ of the critical rule at T."""
    raw = {
        "model": {"preset": "tiny", "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2,
                  "head_dim": 8, "max_position_embeddings": 32, "rope": {"theta": 500.0}},
        "data": {"sources": [{"kind": "synthetic", "task": "prose"}]},
        "mesh": {"data": 8, "fsdp": 1, "tensor": 1, "sequence": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "stages": [{"name": "pose", "seq_len": 32, "steps": 1, "batch_size": 8, "theta_rule": "critical",
                    "pose": {"target_length": 256, "chunks": 2}}],
        "checkpoint": {"every": 0, "keep": 1, "async_save": False},
        "eval": {"heldout_batches": 0},
        "loss_chunk": 32,
        "progress": False,
        "tensorboard": False,
    }  # fmt: skip
    cfg = from_dict(raw)
    run(cfg, run_dir=str(tmp_path), say=lambda *a: None)
    logged = [r["loss"] for r in read_metrics(str(tmp_path / "metrics.jsonl")) if r["kind"] == "train"]
    final = read_config(str(tmp_path / "final"))
    assert final.max_position_embeddings == 256
    crit = model.theta_for_length(256, 500.0, 32, head_dim=8, rule="critical")
    assert final.rope.theta == pytest.approx(crit, rel=1e-12)

    plan = validate(cfg, num_devices=8)[0]
    mesh = make_mesh(plan.mesh)
    engine = build_engine(plan.model, plan.optim, mesh, total_steps=1, loss_chunk=32)

    def first_loss(pose):
        it = make_iterator(plan.data, 32, 8, data_seed(cfg.seed, 0), pose=pose)
        state = engine.init(jax.random.fold_in(jax.random.key(cfg.seed), 0))
        return float(engine.train_step(state, next(it))[1]["loss"])

    assert logged == [first_loss(plan.stage.pose)]
    assert logged != [first_loss(None)]  # the runner did not train on the packed positions
