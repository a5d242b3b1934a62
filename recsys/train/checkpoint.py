"""Orbax checkpoints of the training state, with the config and table sizes beside them.

Every step is sealed: once its save has finished, process 0 writes `sha256sums.json` into the
step directory (sha256 of every other file there). A step is only read after its files match;
one that does not match, or has no checksums (killed between save and seal), is refused with a
warning naming the step and the file, and the newest step before it that matches is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pathlib
import sys
import weakref

import jax
import orbax.checkpoint as ocp

from recsys.config import TrainConfig

CHECKSUMS = "sha256sums.json"  # in each step directory: {"sha256": {relative path: hex digest}}
# Steps saved by a manager whose checksums are not written yet (sealed when the save is done).
_UNSEALED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
    """Starts an asynchronous save of `state` (every process calls this) with JSON metadata.

    The previous save is finished and sealed first (orbax would wait for it anyway).
    """
    _seal(mngr)
    if not mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta))):
        raise CheckpointError(f"checkpoint {mngr.directory}/{step} was not saved: the directory "
                              f"already holds step {mngr.latest_step()}")
    _UNSEALED.setdefault(mngr, []).append(step)


def wait(mngr: ocp.CheckpointManager) -> None:
    """Waits for the last save and seals it."""
    _seal(mngr)
    jax.effects_barrier()


def restore_or_none(mngr: ocp.CheckpointManager, abstract_state, expected_meta: dict,
                    made_for: dict | None = None):
    """Restores the latest verified checkpoint into `abstract_state`'s shapes and shardings.

    Returns (state, meta), or None when the directory holds no usable checkpoint. Steps newer than
    the one restored failed verification: they are deleted, as this run will save over them. A
    checkpoint made for other table sizes or another model is refused with a message naming what
    differs. One whose `made_for` metadata differs (it was made from inputs that have changed
    since) is stale: every checkpoint is deleted and None is returned, so the caller trains afresh.
    """
    step, refused = _latest_verified(mngr)
    for old, _ in refused:
        mngr.delete(old)
    if step is None:
        return None
    meta = _meta(mngr, step)
    if _differs(meta, made_for):
        for old in mngr.all_steps():
            mngr.delete(old)
        return None
    _check_made_for_this_model(mngr, step, meta, expected_meta)
    return _restore(mngr, step, abstract_state), meta


def load_trained(directory: pathlib.Path, abstract_state, expected_meta: dict, *,
                 num_steps: int | None = None, made_for: dict | None = None):
    """Restores a finished training run's latest verified checkpoint; never trains or deletes.

    Returns (state, meta). Raises CheckpointError naming the directory when there is no usable
    checkpoint, when it was made for another model, when it is incomplete (its step is short of
    `num_steps` and it did not stop early) or stale (its `made_for` metadata differs).
    """
    directory = pathlib.Path(directory).absolute()
    with _reading(directory) as mngr:
        step, refused = _latest_verified(mngr) if mngr else (None, [])
        why = "".join(f" ({directory}/{old} refused: {problem})" for old, problem in refused[:1])
        if step is None:
            raise CheckpointError(f"no usable checkpoint in {directory}{why}: run `recsys train` "
                                  f"with this config and --workdir first")
        meta = _meta(mngr, step)
        _check_made_for_this_model(mngr, step, meta, expected_meta)
        if num_steps is not None and meta["step"] < num_steps and not meta.get("early_stopped"):
            raise CheckpointError(
                f"checkpoint {directory}/{step} is incomplete: step {meta['step']} of "
                f"train.num_steps={num_steps}{why}; run `recsys train` with this config and "
                f"--workdir to finish it")
        if _differs(meta, made_for):
            stale = ", ".join(f"{k}={meta.get(k)!r} (now {v!r})" for k, v in made_for.items()
                              if meta.get(k) != v)
            raise CheckpointError(f"checkpoint {directory}/{step} is stale: it was made for "
                                  f"{stale}; run `recsys train` with this config and --workdir")
        return _restore(mngr, step, abstract_state), meta


def latest_meta(directory: pathlib.Path) -> dict | None:
    """The JSON metadata of the latest verified step in `directory` (None when there is none)."""
    with _reading(pathlib.Path(directory).absolute()) as mngr:
        step, _ = _latest_verified(mngr, quiet=True) if mngr else (None, [])
        return None if step is None else _meta(mngr, step)


def verify(step_dir: pathlib.Path) -> str | None:
    """None when every file of the step directory matches its sha256; else what is wrong."""
    step_dir = pathlib.Path(step_dir)
    try:
        want = json.loads((step_dir / CHECKSUMS).read_text())["sha256"]
    except FileNotFoundError:
        return f"it has no {CHECKSUMS} (its save did not complete)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{CHECKSUMS} is unreadable"
    have = _files(step_dir)
    for name in sorted(want.keys() | have.keys()):
        if name not in have:
            return f"{name} is missing"
        if name not in want:
            return f"{name} is not listed in {CHECKSUMS}"
        if _sha256(have[name]) != want[name]:
            return f"{name} does not match its sha256"
    return None


def _seal(mngr: ocp.CheckpointManager) -> None:
    """Finishes pending saves; process 0 writes each new step's checksums (atomically)."""
    mngr.wait_until_finished()
    for step in _UNSEALED.pop(mngr, []):
        step_dir = _step_dir(mngr, step)
        if jax.process_index() != 0 or not step_dir.is_dir():  # removed by max_to_keep
            continue
        sums = {name: _sha256(path) for name, path in _files(step_dir).items()}
        tmp = step_dir / f"{CHECKSUMS}.tmp"
        tmp.write_text(json.dumps({"sha256": sums}, indent=1, sort_keys=True))
        tmp.replace(step_dir / CHECKSUMS)


def _latest_verified(mngr: ocp.CheckpointManager, quiet: bool = False):
    """(newest step whose files match, or None; [(newer step, its problem)], newest first)."""
    refused = []
    for step in sorted(mngr.all_steps(), reverse=True):
        problem = verify(_step_dir(mngr, step))
        if problem is None:
            return step, refused
        refused.append((step, problem))
        if not quiet and jax.process_index() == 0:
            print(f"recsys: warning: checkpoint {mngr.directory}/{step} refused: {problem}; "
                  f"falling back to the step before it", file=sys.stderr, flush=True)
    return None, refused


def _meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    try:
        return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 (orbax raises many types for unreadable files)
        raise CheckpointError(f"checkpoint {mngr.directory}/{step} is unreadable: "
                              f"{str(e).splitlines()[0][:300]}") from None


def _differs(meta: dict, made_for: dict | None) -> bool:
    return any(meta.get(k) != v for k, v in (made_for or {}).items())


def _check_made_for_this_model(mngr, step: int, meta: dict, expected_meta: dict) -> None:
    for key, want in expected_meta.items():
        if meta.get(key) != want:
            raise CheckpointError(
                f"checkpoint {mngr.directory}/{step} was made for {key}={meta.get(key)!r}, "
                f"but this run has {key}={want!r}; use another --workdir or remove the checkpoint")


def _restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:  # noqa: BLE001 (as above: shape mismatches, missing or bad files)
        raise CheckpointError(f"checkpoint {mngr.directory}/{step} does not match this model "
                              f"or is corrupt: {str(e).splitlines()[0][:300]}") from None
    return restored["state"]


@contextlib.contextmanager
def _reading(directory: pathlib.Path):
    """A manager of an existing directory that is only read from (None when there is none).

    Not orbax's read_only option: that logs a warning each time; this one is never written to.
    """
    if not directory.is_dir():
        yield None
        return
    mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
    try:
        yield mngr
    finally:
        mngr.close()


def _step_dir(mngr: ocp.CheckpointManager, step: int) -> pathlib.Path:
    return pathlib.Path(str(mngr.directory)) / str(step)


def _files(step_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Every file under the step directory by relative path, except the checksums themselves."""
    skip = {CHECKSUMS, f"{CHECKSUMS}.tmp"}
    return {str(p.relative_to(step_dir)): p for p in sorted(step_dir.rglob("*"))
            if p.is_file() and str(p.relative_to(step_dir)) not in skip}


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
