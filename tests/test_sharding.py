"""The rules table, sharding helpers and multi-host helpers on the emulated 8-device CPU mesh."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import model
from sharding import distributed
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import (
    ACTIVATION_RULES,
    PARAM_RULES,
    RulesError,
    axis_rules,
    batch_sharding,
    constrain,
    flax_rules,
    local_shape,
    logical_to_spec,
    opt_state_shardings,
    param_shardings,
    replicated,
    shard_params,
)

CFG = model.preset("tiny")


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(data=1, fsdp=2, tensor=2, sequence=2))


@pytest.fixture(scope="module")
def params(mesh):
    """(plain, sharded) params from the same key: one compile each, shared by the tests below."""
    key = jax.random.key(3)
    return model.init_params(CFG, key), model.init_params(
        CFG, key, out_shardings=param_shardings(model.abstract_params(CFG), mesh)
    )


def test_rules_table_specs():
    assert logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp"), "sequence", None)
    assert logical_to_spec(("batch", "length", "heads", "head_dim")) == P(("data", "fsdp"), "sequence", "tensor", None)
    assert logical_to_spec(("embed", "heads", "head_dim"), PARAM_RULES) == P("fsdp", "tensor", None)
    assert logical_to_spec(("layers", "mlp", "embed"), PARAM_RULES) == P(None, "tensor", "fsdp")
    assert logical_to_spec(("vocab", "embed"), PARAM_RULES) == P("tensor", "fsdp")
    assert logical_to_spec((None, "length")) == P(None, "sequence")


def test_collision_and_unknown_names_raise():
    with pytest.raises(RulesError, match="'tensor' would shard both 'heads' and 'mlp'"):
        logical_to_spec(("heads", "mlp"), ACTIVATION_RULES)
    with pytest.raises(RulesError, match="'fsdp' would shard both"):
        logical_to_spec(("batch", "embed"), {"batch": ("data", "fsdp"), "embed": ("fsdp",)})
    with pytest.raises(RulesError, match="no sharding rule for logical axis 'seq'"):
        logical_to_spec(("batch", "seq"))
    with pytest.raises(RulesError, match="rank 3"):
        logical_to_spec(("batch", "length"), ACTIVATION_RULES, {"data": 1}, (1, 2, 3))


def test_divisibility_falls_back_to_replication_by_prefix():
    sizes = {"data": 2, "fsdp": 4, "tensor": 2, "sequence": 1}
    # batch 2 is divisible by data=2 but not by data*fsdp=8: keeps ("data",), replicates over fsdp.
    assert logical_to_spec(("batch", "length"), ACTIVATION_RULES, sizes, (2, 16)) == P("data", "sequence")
    assert logical_to_spec(("batch", "length"), ACTIVATION_RULES, sizes, (1, 16)) == P(None, "sequence")
    assert logical_to_spec(("batch", "length"), ACTIVATION_RULES, sizes, (8, 16)) == P(("data", "fsdp"), "sequence")
    # kv_heads=1 on tensor=2 is replicated.
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), PARAM_RULES, sizes, (64, 1, 16)) == P("fsdp", None, None)
    assert local_shape(("batch", "length"), (2, 16), ACTIVATION_RULES, sizes) == (1, 16)
    with pytest.raises(RulesError, match=r"dimension 0 \('batch', size 2\) is not divisible by mesh axes"):
        logical_to_spec(("batch", "length"), ACTIVATION_RULES, sizes, (2, 16), strict=True)


def test_param_shardings_init_and_shard_params(mesh, params):
    shardings = param_shardings(model.abstract_params(CFG), mesh)
    assert shardings["layers"]["attn"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor", None)
    assert shardings["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")
    # A ring-attention config has the same parameters (and needs no mesh to describe them).
    assert param_shardings(model.abstract_params(CFG.replace(attention_impl="ring")), mesh) == shardings
    plain, sharded = params
    # Real params with their names give the same tree as the boxed abstract one.
    assert param_shardings(plain, mesh, names=model.logical_axes(CFG)) == shardings
    with pytest.raises(RulesError, match="carries no logical axis names"):
        param_shardings(plain, mesh)
    with pytest.raises(RulesError, match="names does not match the parameter tree"):
        param_shardings(
            plain, mesh, names=model.logical_axes(CFG.replace(tie_word_embeddings=not CFG.tie_word_embeddings))
        )
    assert jax.tree.structure(sharded) == jax.tree.structure(shardings)
    names = model.logical_axes(CFG)
    is_names = lambda x: isinstance(x, tuple) and all(isinstance(e, str) for e in x)  # noqa: E731
    for x, s, n, ref in zip(
        jax.tree.leaves(sharded),
        jax.tree.leaves(shardings),
        jax.tree.leaves(names, is_leaf=is_names),
        jax.tree.leaves(plain),
        strict=True,
    ):
        assert x.sharding.is_equivalent_to(s, x.ndim)
        expect = local_shape(n, x.shape, PARAM_RULES, mesh)
        assert {tuple(sh.data.shape) for sh in x.addressable_shards} == {expect}
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ref))
    moved = shard_params(plain, mesh, model.logical_axes(CFG))
    q = moved["layers"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (
        CFG.num_layers,
        CFG.hidden_size // 2,
        CFG.num_heads // 2,
        CFG.head_dim,
    )


def test_constrain_reshards_inside_jit(mesh):
    x = jax.device_put(jnp.arange(4 * 8 * 6, dtype=jnp.float32).reshape(4, 8, 6), replicated(mesh))
    fn = jax.jit(axis_rules(mesh)(lambda a: constrain(a * 2.0, ("batch", "length", "embed"), mesh)))
    out = fn(x)
    # data=1, so the compiled output's spec drops it: compare as shardings, and the shard shapes.
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), "sequence", None)), 3)
    assert out.addressable_shards[0].data.shape == (2, 4, 6)
    np.testing.assert_array_equal(np.asarray(out), 2.0 * np.asarray(x))
    assert "sharding" in fn.lower(x).as_text()
    with pytest.raises(RulesError, match="needs a jax.sharding.Mesh"):
        constrain(x, ("batch", "length", "embed"), None)
    # Never a silent no-op: a mesh without installed rules is an error, not an unsharded result.
    with pytest.raises(RulesError, match="no logical-axis rules are installed"):
        jax.jit(lambda a: constrain(a, ("batch", "length", "embed"), mesh))(x)


def test_installed_rules_are_the_table_for_the_mesh():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4, tensor=1, sequence=1))
    assert dict(flax_rules(mesh))["batch"] == ("data", "fsdp") and dict(flax_rules(mesh))["embed"] is None
    assert dict(flax_rules({"sequence": 8}))["batch"] is None  # axes the mesh lacks are dropped
    with axis_rules(mesh):
        # Flax's own resolver reads the same installed list...
        assert nn.logical_to_mesh_axes(("batch", "length", "heads")) == P(("data", "fsdp"), "sequence", "tensor")
        x = jnp.zeros((2, 16, 4), jnp.float32)
        # ...and constrain adds the table's divisibility rule: batch 2 keeps data=2, replicates over fsdp.
        out = jax.jit(lambda a: constrain(a + 1.0, ("batch", "length", "embed"), mesh))(x)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, None)), 3)
    assert out.addressable_shards[0].data.shape == (1, 16, 4)
    with nn.logical_axis_rules((("batch", "data"), ("batch", "fsdp"))):
        with pytest.raises(RulesError, match="list 'batch' twice"):
            constrain(x, ("batch", None, None), mesh)


def test_model_activations_follow_the_installed_rules():
    """The model constrains its hidden states by the rules the caller installs (and refuses a mesh without them)."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2, sequence=2))
    cfg = CFG.replace(attention_impl="reference")
    params = model.init_params(cfg, jax.random.key(0))
    tokens = jnp.zeros((1, 8), jnp.int32)  # batch 1 does not divide fsdp=2: it is replicated, not an error
    net = model.Llama(cfg, mesh=mesh)
    fn = jax.jit(lambda p, t: net.apply({"params": p}, t, return_hidden=True))
    with pytest.raises(RulesError, match="no logical-axis rules are installed"):
        fn(params, tokens)
    with axis_rules(mesh):
        hidden = fn(params, tokens)
    assert hidden.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "sequence", None)), 3)
    # Rules that send 'length' nowhere give a different sharding: the constraint reads the installed rules.
    custom = tuple((name, None if name == "length" else axes) for name, axes in flax_rules(mesh))
    with nn.logical_axis_rules(custom):
        hidden = jax.jit(lambda p, t: net.apply({"params": p}, t, return_hidden=True))(params, tokens)
    assert hidden.sharding.is_equivalent_to(NamedSharding(mesh, P()), 3)


def test_batch_sharding(mesh):
    assert batch_sharding(mesh).spec == P(("data", "fsdp"), "sequence")
    tokens = jax.device_put(jnp.zeros((4, 16), jnp.int32), batch_sharding(mesh, (4, 16)))
    assert tokens.addressable_shards[0].data.shape == (2, 8)
    # batch 1 cannot be split over fsdp=2: the rule replicates it instead of failing in device_put.
    assert batch_sharding(mesh, (1, 16)).shard_shape((1, 16)) == (1, 8)


def test_opt_state_shardings_mirror_params(mesh, params):
    shardings = param_shardings(model.abstract_params(CFG), mesh)
    params = params[1]
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    abstract = jax.eval_shape(opt.init, params)
    state_sh = opt_state_shardings(abstract, shardings, params, mesh)
    adam = state_sh[1][0]
    assert jax.tree.structure(state_sh) == jax.tree.structure(abstract)
    assert adam.mu["layers"]["mlp"]["down_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
    assert adam.nu["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")
    assert adam.count.spec == P()
    state = jax.jit(opt.init, out_shardings=state_sh)(params)
    mu = state[1][0].mu["layers"]["attn"]["o_proj"]["kernel"]
    assert mu.sharding.spec == P(None, "tensor", None, "fsdp")


def test_detect_cluster():
    assert distributed.detect_cluster({}) is None
    assert distributed.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert distributed.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "slurm"
    assert distributed.detect_cluster({"OMPI_COMM_WORLD_SIZE": "2"}) == "mpi"
    assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
    assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "a"}) is None
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}
    assert distributed.detect_cluster(env) == "env"


def test_initialize_distributed(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for var in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("MEGASCALE_COORDINATOR_ADDRESS", raising=False)
    assert distributed.initialize_distributed() is False and calls == []  # single process: no-op
    assert distributed.initialize_distributed("host:1234", 2, 1) is True
    assert calls == [dict(coordinator_address="host:1234", num_processes=2, process_id=1, local_device_ids=None)]
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed.initialize_distributed() is True
    assert calls[-1]["coordinator_address"] is None  # jax reads the SLURM environment itself
    with pytest.raises(distributed.DistributedError, match="need coordinator_address"):
        distributed.initialize_distributed(num_processes=2, process_id=0)
    with pytest.raises(distributed.DistributedError, match="outside 0..1"):
        distributed.initialize_distributed("host:1", 2, 5)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    n = len(calls)
    assert distributed.initialize_distributed("host:1", 2, 0) is True and len(calls) == n  # idempotent


def test_global_array_from_process_data(mesh):
    data = np.arange(4 * 16, dtype=np.int32).reshape(4, 16)
    sh = batch_sharding(mesh, data.shape)
    index = distributed.process_local_index(sh, data.shape)
    assert index == (slice(0, 4), slice(0, 16))  # one process holds every shard
    arr = distributed.global_array_from_process_data(data[index], sh, data.shape)
    assert arr.sharding == sh and arr.shape == data.shape
    np.testing.assert_array_equal(np.asarray(arr), data)
