"""Orbax checkpoints of the whole train state and the data position.

A checkpoint is named by the number of mini-batches trained (the data position) and
holds: the replicated parts of the :class:`~anp_jax.train.TrainState` (params, batch
statistics, optimizer state, step, RNG) once, the noise registers (and Free-AT's input
perturbation) of every local device,
and a small JSON record of the host loop (running sums of the epoch's loss).

Orbax writes into a temporary directory and renames it when complete, so a run killed
mid-save leaves no half checkpoint under a final name; old checkpoints are deleted only
after a newer one is complete.  A checkpoint that cannot be read is reported in one line,
moved aside to ``corrupt-<step>`` (never deleted) and the previous one is used.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from anp_jax.train import TrainState

PyTree = Any


class CheckpointError(Exception):
    """No usable checkpoint where one was expected."""


def first_replica(x: jax.Array) -> np.ndarray:
    """The copy on the first device of a replicated ``[devices, ...]`` array, on the host
    (read from the shard itself: indexing the global array would compile a gather)."""
    return np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:])


def _host_tree(state: TrainState) -> dict:
    """The state as host arrays: replicated parts from device 0, registers from all."""
    first = jax.tree.map(first_replica, state.replace(noise=None, adv_delta=None))
    return {
        "step": first.step, "batches": first.batches, "params": first.params,
        "batch_stats": first.batch_stats, "opt_state": first.opt_state, "rng": first.rng,
        "noise": jax.tree.map(np.asarray, state.noise),
        "adv_delta": np.asarray(state.adv_delta),
    }


def manager(directory: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """A checkpoint manager for ``directory`` (created if needed)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=("state", "loop"))


def save(mngr: ocp.CheckpointManager, state: TrainState, loop: dict) -> None:
    """Saves a replicated (pmapped) state and the host loop record under its data position."""
    tree = _host_tree(state)
    mngr.save(int(tree["batches"]), args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), loop=ocp.args.JsonSave(loop)))
    mngr.wait_until_finished()


def _print_err(msg: str) -> None:
    print(msg, file=sys.stderr)


def restore_latest(mngr: ocp.CheckpointManager, template: TrainState,
                   devices: list[jax.Device], log: Callable[[str], None] = _print_err
                   ) -> tuple[TrainState, dict] | None:
    """Restores the newest readable checkpoint into ``template``, replicated over ``devices``.

    Returns ``(state, loop)``, or None when there is no checkpoint.  Unreadable
    checkpoints are reported with ``log``, moved aside and skipped.
    """
    target = _host_tree(template)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), loop=ocp.args.JsonRestore()))
            tree, loop = restored["state"], dict(restored["loop"])
            _check_same_structure(tree, target)
        except Exception as err:  # any unreadable checkpoint: report, keep, skip
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            path = os.path.join(str(mngr.directory), str(step))
            aside = os.path.join(str(mngr.directory), f"corrupt-{step}")
            log(f"checkpoint {path} is unreadable ({type(err).__name__}: {reason}); "
                f"moved to {aside}, using the previous one")
            if os.path.exists(path):
                os.replace(path, aside)
            mngr.reload()
            continue
        return _to_state(tree, template, devices), loop
    return None


def _check_same_structure(tree: PyTree, target: PyTree) -> None:
    for got, want in zip(jax.tree.leaves(tree), jax.tree.leaves(target)):
        if np.shape(got) != np.shape(want):
            raise ValueError(f"shape {np.shape(got)} where {np.shape(want)} was expected")


def _to_state(tree: dict, template: TrainState, devices: list[jax.Device]) -> TrainState:
    n = len(devices)
    mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
    sharding = jax.NamedSharding(mesh, jax.P("devices"))

    def shard(x: np.ndarray) -> jax.Array:
        return jax.device_put(np.asarray(x), sharding)

    def replicate(x: np.ndarray) -> jax.Array:
        return shard(np.stack([np.asarray(x)] * n))

    return template.replace(
        step=replicate(tree["step"]), batches=replicate(tree["batches"]),
        params=jax.tree.map(replicate, tree["params"]),
        batch_stats=jax.tree.map(replicate, tree["batch_stats"]),
        opt_state=jax.tree.map(replicate, tree["opt_state"]),
        rng=replicate(tree["rng"]), noise=jax.tree.map(shard, tree["noise"]),
        adv_delta=shard(tree["adv_delta"]))


def restore_variables(directory: str, log: Callable[[str], None] = _print_err
                      ) -> tuple[dict, dict, int]:
    """``(params, batch_stats, data position)`` of the newest readable checkpoint in
    ``directory``, as host arrays, whatever the training method and number of devices.

    Read-only: an unreadable checkpoint is reported with ``log`` and the previous one is
    tried; nothing is moved or deleted.  Raises :class:`CheckpointError` when no checkpoint
    can be read.
    """
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoint in {os.path.dirname(directory) or '.'} (no "
                              f"{os.path.basename(directory)}/ directory)")
    mngr = manager(directory)
    reason = ""
    try:
        steps = sorted(mngr.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {directory}")
        for step in steps:
            try:
                tree = mngr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore()))["state"]
                return tree["params"], tree.get("batch_stats") or {}, int(step)
            except Exception as err:  # unreadable: report, keep, try the previous one
                text = str(err).strip().splitlines()
                reason = f"{type(err).__name__}: {text[0][:200] if text else ''}"
                log(f"checkpoint {os.path.join(directory, str(step))} is unreadable "
                    f"({reason}); trying the previous one")
    finally:
        mngr.close()
    raise CheckpointError(f"no readable checkpoint in {directory} ({reason})")
