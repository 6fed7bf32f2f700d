"""Curriculum context-extension training: data, the sharded train step, checkpoints, stages, CLI.

    import train
    cfg = train.load_config("configs/demo.yaml", ["stages.1.steps=10"])
    result = train.run(cfg, run_dir="runs/demo")          # or: python -m train --config ...

Pieces: the data pipeline (`DataConfig`, `make_iterator`, `heldout_batches`, `pack_documents`,
PoSE positions `PoseConfig` / `pose_batch`),
the engine (`OptimConfig`, `TrainState`, `build_engine` — optimizer, shardings and jitted steps built
once — `chunked_cross_entropy`, `Checkpointer`, `check_finite`), a stage ready to run (`build_stage`,
`StageRun`), and the runner (`TrainConfig`,
`StageConfig`, `validate`, `run`, `MetricsLogger`).
"""

from model.loss import chunked_cross_entropy
from train.checkpoint import Checkpointer, CheckpointError
from train.config import (
    CheckpointConfig,
    EvalConfig,
    ExportConfig,
    StageConfig,
    StagePlan,
    TrainConfig,
    config_help,
    dump_config,
    load_config,
    model_config,
    validate,
)
from train.curriculum import run
from train.data import heldout_batches, make_iterator
from train.data_config import DataConfig, DataError, SourceConfig
from train.flops import flops_per_token, train_step_flops
from train.guards import NonFiniteError, check_finite
from train.metrics import DEVICE_PEAK_TFLOPS, MetricsLogger, device_peak_tflops, mfu, plot_run, read_metrics
from train.optim import OptimConfig, make_optimizer, make_schedule
from train.packing import pack_documents, unpack_documents
from train.pose import PoseConfig, apply_pose, draw_pose_positions, pose_batch
from train.report import RunResult
from train.stage import Engine, StageRun, build_engine, build_stage, move_state, stage_depth
from train.state import (
    TrainState,
    abstract_state,
    frozen_params,
    full_params,
    init_state,
    merged_params,
    state_shardings,
)
from train.step import make_eval_step, make_train_step

__all__ = [
    "DEVICE_PEAK_TFLOPS",
    "CheckpointConfig",
    "CheckpointError",
    "Checkpointer",
    "DataConfig",
    "DataError",
    "Engine",
    "EvalConfig",
    "ExportConfig",
    "MetricsLogger",
    "NonFiniteError",
    "OptimConfig",
    "PoseConfig",
    "RunResult",
    "SourceConfig",
    "StageRun",
    "StageConfig",
    "StagePlan",
    "TrainConfig",
    "TrainState",
    "abstract_state",
    "apply_pose",
    "build_engine",
    "build_stage",
    "check_finite",
    "chunked_cross_entropy",
    "config_help",
    "device_peak_tflops",
    "draw_pose_positions",
    "dump_config",
    "flops_per_token",
    "heldout_batches",
    "frozen_params",
    "full_params",
    "init_state",
    "merged_params",
    "load_config",
    "make_eval_step",
    "make_iterator",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "mfu",
    "model_config",
    "move_state",
    "pack_documents",
    "plot_run",
    "pose_batch",
    "read_metrics",
    "run",
    "stage_depth",
    "state_shardings",
    "train_step_flops",
    "unpack_documents",
    "validate",
]
