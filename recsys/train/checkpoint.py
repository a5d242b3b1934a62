"""Orbax checkpoints of the training state, with the config and table sizes beside them."""

from __future__ import annotations

import json
import pathlib

import jax
import orbax.checkpoint as ocp

from recsys.config import TrainConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored into this run (other model shape, corrupt files)."""


def make_manager(directory: pathlib.Path, cfg: TrainConfig) -> ocp.CheckpointManager:
    """Keeps the last cfg.keep_checkpoints steps; saves run in the background.

    A save is written under a temporary name and renamed when every process has finished, so a
    run killed mid-save leaves no step that looks complete; the leftover is removed here.
    """
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints,
                                           enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def as_json(meta: dict) -> dict:
    """The form metadata takes after a JSON round trip (tuples become lists), for comparisons."""
    return json.loads(json.dumps(meta))


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
    """Starts an asynchronous save of `state` (every process calls this) with JSON metadata."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(meta)))


def restore_or_none(mngr: ocp.CheckpointManager, abstract_state, expected_meta: dict,
                    made_for: dict | None = None):
    """Restores the latest checkpoint into `abstract_state`'s shapes and shardings.

    Returns (state, meta), or None when the directory holds no checkpoint. A checkpoint made for
    other table sizes or another model is refused with a message naming what differs. One whose
    `made_for` metadata differs (it was made from inputs that have changed since) is stale: every
    checkpoint is deleted and None is returned, so the caller trains afresh.
    """
    step = mngr.latest_step()
    if step is None:
        return None
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 (orbax raises many types for unreadable files)
        raise CheckpointError(f"checkpoint {mngr.directory}/{step} is unreadable: {e}") from None
    if any(meta.get(k) != v for k, v in (made_for or {}).items()):
        for old in mngr.all_steps():
            mngr.delete(old)
        return None
    for key, want in expected_meta.items():
        if meta.get(key) != want:
            raise CheckpointError(
                f"checkpoint {mngr.directory}/{step} was made for {key}={meta.get(key)!r}, "
                f"but this run has {key}={want!r}; use another --workdir or remove the checkpoint")
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:  # noqa: BLE001 (as above: shape mismatches, missing or bad files)
        raise CheckpointError(f"checkpoint {mngr.directory}/{step} does not match this model "
                              f"or is corrupt: {str(e).splitlines()[0][:300]}") from None
    return restored["state"], meta


def wait(mngr: ocp.CheckpointManager) -> None:
    mngr.wait_until_finished()
    jax.effects_barrier()
