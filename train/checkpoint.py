"""Checkpoints: an orbax ``CheckpointManager`` holding the train state and a JSON metadata record.

Each step directory holds two items: ``state`` (the `TrainState` pytree, ``StandardSave``) and
``meta`` (``JsonSave``: stage, global step, data-iterator state, RNG key data, config dicts — whatever
the runner needs to resume exactly). Properties the trainer relies on:

- **Async**: `Checkpointer.save` returns once the arrays are copied off the devices; the files are
  written in a background thread, so the next (donating) train step may run at once. `wait` blocks
  until the write is committed.
- **Atomic**: orbax writes into ``<step>.orbax-checkpoint-tmp-*`` and renames it to ``<step>`` only
  after everything is on disk, so a save killed halfway never replaces or hides the last good
  checkpoint; `latest_step` only sees committed steps and leftover tmp dirs are removed when the
  directory is next opened.
- **Any mesh**: `restore` reads into an abstract target (``jax.ShapeDtypeStruct`` with the
  *current* mesh's shardings, `train.stage.Engine.restore_target`), so a checkpoint written on one mesh
  shape restores onto another.
- **Keep-N**: older steps beyond ``keep`` are deleted after a newer one is committed, except the
  ``protect`` steps (the stage ends that later stages branch from: a resume needs them).
- **LoRA**: a state's ``frozen`` base is never written (only adapters, trainable leaves, moments and
  step), so a LoRA checkpoint is adapter-sized; the runner re-attaches the base from ``--init-from``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preserve


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or does not fit; the message names it and the fix."""


class Checkpointer:
    """Save and restore ``(state, meta)`` pairs under ``directory``, one sub-directory per step.

    Args:
        directory: the checkpoint root (created if missing).
        keep: committed steps to keep (older ones are deleted); ``None`` keeps all.
        async_save: write in a background thread (`wait` before exiting or reading back).
        read_only: open an existing directory for restoring only (never creates or deletes).
        protect: steps never deleted by keep-N (they do not count towards ``keep``).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        keep: int | None = 3,
        async_save: bool = True,
        *,
        read_only: bool = False,
        protect: Iterable[int] = (),
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(f"no checkpoint directory at {self.directory}: check the path (or train first).")
        if keep is not None and keep < 1:
            raise CheckpointError(f"checkpoint keep must be ≥ 1 (or None for all), got {keep}.")
        policy = None
        if keep is not None and not read_only:
            policy = preserve.AnyPreservationPolicy([preserve.LatestN(keep), preserve.CustomSteps(sorted(protect))])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            # A save killed mid-write leaves a tmp dir; remove such debris when the directory is reopened.
            cleanup_tmp_directories=not read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    # ------------------------------------------------------------------ saving
    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start saving ``state`` and the JSON-serialisable ``meta`` as ``step`` (async unless disabled)."""
        if getattr(state, "frozen", None) is not None:
            state = state.replace(frozen=None)  # the LoRA base: restored from --init-from, not stored here
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta)))
        self._manager.save(int(step), args=args, force=True)

    def wait(self) -> None:
        """Block until every started save is committed to disk."""
        self._manager.wait_until_finished()

    # ------------------------------------------------------------------ reading
    def latest_step(self) -> int | None:
        """The newest committed step, or ``None`` when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first."""
        return sorted(self._manager.all_steps())

    def _resolve(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(
                    f"no committed checkpoint in {self.directory}: train first, or point at the run directory."
                )
        elif int(step) not in self._manager.all_steps():
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}; available steps: {self.all_steps() or 'none'}."
            )
        return int(step)

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """Only the metadata of ``step`` (default: the latest), e.g. to rebuild configs before restoring."""
        step = self._resolve(step)
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore ``(state, meta)`` of ``step`` (``None``: the latest) onto ``abstract_state``'s shardings.

        Args:
            step: the step to read, or ``None`` for the newest committed one.
            abstract_state: the target tree of ``jax.ShapeDtypeStruct`` carrying shardings for the
                current mesh (`train.stage.Engine.restore_target`); it may differ from the writer's mesh.
        """
        step = self._resolve(step)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        try:
            out = self._manager.restore(step, args=args)
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not match the model/optimizer being restored "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}): use the same model and optimizer "
                "config as the run that wrote it."
            ) from exc
        return out["state"], dict(out["meta"])

    def restore_params(self, step: int, target: Any) -> Any:
        """Only the ``params`` of ``step``'s state, onto ``target`` (sharded ``jax.ShapeDtypeStruct`` leaves)."""
        step = self._resolve(step)
        restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
        args = ocp.args.PyTreeRestore(item={"params": target}, restore_args={"params": restore_args},
                                      partial_restore=True)  # fmt: skip
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(state=args))
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"the parameters of checkpoint step {step} in {self.directory} do not match the model being "
                f"initialised ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}): keep the checkpoint's model."
            ) from exc
        return out["state"]["params"]

    def close(self) -> None:
        """Wait for pending saves and release the manager's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is one step of a run's ``checkpoints/`` (e.g. ``runs/x/checkpoints/6``)."""
    path = os.path.abspath(os.fspath(path))
    parts = ("state", "meta")
    return os.path.basename(path).isdigit() and all(os.path.isdir(os.path.join(path, p)) for p in parts)


def step_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of the training checkpoint step directory ``path``."""
    root, step = os.path.split(os.path.abspath(os.fspath(path)))
    with Checkpointer(root, read_only=True) as ck:
        return ck.read_meta(int(step))


def step_params(path: str | os.PathLike, target: Any) -> Any:
    """The params of the training checkpoint step directory ``path``, onto ``target``'s shardings."""
    root, step = os.path.split(os.path.abspath(os.fspath(path)))
    with Checkpointer(root, read_only=True) as ck:
        return ck.restore_params(int(step), target)
