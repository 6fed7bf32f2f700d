"""Sharding for ringllama: the mesh, the logical-axis rules table, multi-host start-up, the memory planner.

mesh = make_mesh(MeshConfig(data=2, sequence=4))
params = model.init_params(cfg, key, out_shardings=param_shardings(model.abstract_params(cfg), mesh))
tokens = jax.device_put(tokens, batch_sharding(mesh, tokens.shape))
with axis_rules(mesh):  # the activation rules, installed around whatever traces the model
    logits = jax.jit(model.Llama(cfg, mesh=mesh).apply)({"params": params}, tokens)
plan = plan_memory(cfg, model.abstract_params(cfg), seq_len=1 << 20, batch=1, mesh=MeshConfig(fsdp=8, sequence=64))
hops = overlap_plan(seq_len=1 << 20, ring=64, ...)  # ring hop compute vs K/V transfer (sharding.comm)
"""

from sharding.comm import CommError, OverlapPlan, overlap_plan
from sharding.cp_plan import LINKS, StrategyPlan, plan_strategies, recommend, resolve_context_parallel
from sharding.distributed import (
    DistributedError,
    detect_cluster,
    global_array_from_process_data,
    initialize_distributed,
    process_local_index,
)
from sharding.mesh import AXES, MeshConfig, MeshError, make_mesh
from sharding.planner import MemoryPlan, PlanError, plan_memory
from sharding.rules import (
    ACTIVATION_RULES,
    PARAM_RULES,
    RULES_TABLE,
    RulesError,
    axis_rules,
    batch_sharding,
    constrain,
    flax_rules,
    local_shape,
    logical_to_axes,
    logical_to_spec,
    opt_state_shardings,
    param_names_and_shapes,
    param_shardings,
    replicated,
    shard_params,
)

__all__ = [
    "LINKS",
    "StrategyPlan",
    "plan_strategies",
    "recommend",
    "resolve_context_parallel",
    "ACTIVATION_RULES",
    "AXES",
    "CommError",
    "PARAM_RULES",
    "RULES_TABLE",
    "DistributedError",
    "MeshConfig",
    "MemoryPlan",
    "MeshError",
    "OverlapPlan",
    "PlanError",
    "RulesError",
    "axis_rules",
    "batch_sharding",
    "constrain",
    "detect_cluster",
    "flax_rules",
    "global_array_from_process_data",
    "initialize_distributed",
    "local_shape",
    "logical_to_axes",
    "logical_to_spec",
    "make_mesh",
    "opt_state_shardings",
    "overlap_plan",
    "param_names_and_shapes",
    "param_shardings",
    "plan_memory",
    "process_local_index",
    "replicated",
    "shard_params",
]
