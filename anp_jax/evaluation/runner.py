"""The one evaluation engine: a batched, pmapped, masked map over an evaluation split.

Every evaluator of :mod:`anp_jax.evaluation` computes its metric with :meth:`Runner.map`:
a function of one batch that returns per-example values runs under ``jax.pmap`` over the
devices, batch by batch, and the values of the real (unmasked) examples come back to the host
in the order of the split.  Sums and means go through :meth:`Runner.total`, which adds the
processes' shares (multi-host), so each example counts exactly once.

Batches are those of data sources' ``eval_batches()``: ``{"image": f32 [D, b,
H, W, C], "label": i32 [D, b], "mask": bool [D, b]}`` with ``D`` the local devices; the last
batch is padded and ``mask`` is False on the padding.  A split small enough
(``cache_bytes``) is kept in host memory after the first pass; a larger one (ImageNet) is
read again from its source for every pass.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from anp_jax.train import logits_fn as make_logits_fn

PyTree = Any
Batch = dict[str, np.ndarray]
BatchFn = Callable[[PyTree, Batch, jax.Array], PyTree]
AXIS = "batch"


@dataclasses.dataclass(eq=False)
class Model:
    """A classifier to evaluate, without noise.

    Attributes:
      apply_fn: the Flax module's ``apply`` (``apply(variables, images, train=False)``).
      variables: ``{"params": ..., "batch_stats": ...}`` (host or device arrays).
      points: the perturbation points, shallow to deep (``module.perturbation_points()``).
    """

    apply_fn: Callable
    variables: Mapping[str, PyTree]
    points: tuple[str, ...] = ()

    @classmethod
    def from_module(cls, module: Any, variables: Mapping[str, PyTree]) -> Model:
        return cls(module.apply, dict(variables), tuple(module.perturbation_points()))

    @property
    def arch(self) -> Any:
        """Identifies the architecture: models that share it share compiled programs."""
        return self.apply_fn

    @staticmethod
    def logits(apply_fn: Callable, variables: Mapping[str, PyTree]
               ) -> Callable[[jax.Array], jax.Array]:
        """``images -> logits`` in evaluation mode (traceable inside a program)."""
        return make_logits_fn(apply_fn, variables["params"], variables.get("batch_stats", {}))


def stable_hash(text: str) -> int:
    """A 31-bit integer of ``text``, the same on every machine (for PRNG keys)."""
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


class Runner:
    """Runs per-batch functions over one evaluation split under ``jax.pmap``.

    Args:
      batches: a function returning a fresh iterator of batches (``source.eval_batches``),
        or the batches themselves (an iterable: kept in memory after the first pass).
      devices: the local devices that share a batch, or None for every device of every
        process (multi-host: each process gives the batches of its own shard, the same
        number of them).
      seed: seeds every PRNG key of the evaluation (see :meth:`key`).
      cache_bytes: keep the split in host memory when it is at most this big.
      programs: a cache of compiled programs to share with another runner of the same
        devices (e.g. over another split of the same data).
    """

    def __init__(self, batches: Callable[[], Iterable[Batch]] | Iterable[Batch], *,
                 devices: Sequence[jax.Device] | None = None, seed: int = 0,
                 cache_bytes: int = 1 << 31, programs: dict | None = None):
        self.devices = list(devices) if devices is not None else None
        self.local_devices = self.devices or jax.local_devices()
        self.n_dev = len(self.local_devices)
        self.seed = seed
        self._cache_bytes = cache_bytes
        if callable(batches):
            self._make, self._cached = batches, None
        else:
            self._make, self._cached = None, None
            self._once = iter(batches)
        self.programs = {} if programs is None else programs
        self._labels: np.ndarray | None = None
        self._num_examples: int | None = None
        # RngBitGenerator keys for attacks and analyses: on CPU each random field compiles
        # ~1 s faster than with threefry.  Data transforms (corruptions, perturbation
        # sequences) keep threefry keys: jax.random.poisson (shot noise) needs threefry.
        self._key = jax.random.key(seed, impl="rbg")
        self._data_key = jax.random.PRNGKey(seed)

    # -- the split --------------------------------------------------------------------
    def batches(self) -> Iterator[Batch]:
        """The batches of the split, host numpy arrays."""
        if self._cached is None and self._make is None:  # one pass only: keep it all
            self._cached = [{k: np.asarray(v) for k, v in b.items()} for b in self._once]
        if self._cached is not None:
            yield from self._cached
            return
        keep: list[Batch] | None = []
        size = 0
        for batch in self._make():
            batch = {k: np.asarray(v) for k, v in batch.items()}
            if keep is not None:
                size += sum(v.nbytes for v in batch.values())
                if size <= self._cache_bytes:
                    keep.append(batch)
                else:
                    keep = None
            yield batch
        if keep is not None:
            self._cached = keep

    def labels(self) -> np.ndarray:
        """Labels ``[N]`` of this process's real examples, in split order."""
        if self._labels is None:
            self._labels = np.concatenate(
                [b["label"].reshape(-1)[b["mask"].reshape(-1)] for b in self.batches()]
                or [np.zeros((0,), np.int32)])
        return self._labels

    @property
    def num_examples(self) -> int:
        """Real examples of the whole split, over every process."""
        if self._num_examples is None:
            self._num_examples = int(round(self.total(np.ones(len(self.labels())))))
            if not self._num_examples:
                raise ValueError("evaluation split is empty")
        return self._num_examples

    def arrays(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Images ``[n, H, W, C]`` and labels ``[n]`` of the first ``limit`` real examples of
        this process (all of them by default), on the host."""
        images, labels, n = [], [], 0
        for b in self.batches():
            if limit is not None and n >= limit:
                break
            mask = b["mask"].reshape(-1)
            images.append(b["image"].reshape((-1,) + b["image"].shape[2:])[mask])
            labels.append(b["label"].reshape(-1)[mask])
            n += int(mask.sum())
        return np.concatenate(images)[:limit], np.concatenate(labels)[:limit]

    def subset(self, limit: int, per_device: int) -> Runner:
        """A runner over the first ``limit`` examples of this process, ``per_device``
        examples per device and batch (for analyses whose batches must be small)."""
        images, labels = self.arrays(limit)
        return Runner(padded_batches(images, labels, per_device, self.n_dev),
                      devices=self.local_devices, seed=self.seed,
                      programs=self.programs if self.devices is not None else None)

    # -- randomness -------------------------------------------------------------------
    def key(self, *names: str | int, data: bool = False) -> jax.Array:
        """A PRNG key of the evaluation's seed and ``names``: the same names give the same
        key in every run (so that two models are attacked from the same random starts)."""
        key = self._data_key if data else self._key
        for name in names:
            key = jax.random.fold_in(key, name if isinstance(name, int) else stable_hash(name))
        return key

    # -- running ----------------------------------------------------------------------
    def _program(self, cache_key: Any, fn: BatchFn) -> Callable:
        if cache_key not in self.programs:
            def per_device(args, batch, rng):
                return fn(args, batch, jax.random.fold_in(rng, jax.lax.axis_index(AXIS)))

            self.programs[cache_key] = jax.pmap(per_device, axis_name=AXIS,
                                                 in_axes=(None, 0, None),
                                                 devices=self.devices)
        return self.programs[cache_key]

    @staticmethod
    def _fetch(tree: PyTree) -> PyTree:
        """This process's part of a pmapped output, ``[devices, b, ...] -> [devices * b, ...]``."""
        def local(x: jax.Array) -> np.ndarray:
            shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
            v = np.concatenate([np.asarray(s.data) for s in shards])
            return v.reshape((-1,) + v.shape[2:])

        return jax.tree.map(local, tree)

    def map(self, fn: BatchFn, args: PyTree, *, cache_key: Any, rng: jax.Array,
            transform: Callable[[np.ndarray, int], Any] | None = None) -> PyTree:
        """``fn`` over every batch; its per-example values for the real examples.

        Args:
          fn: ``fn(args, batch, rng) -> pytree of arrays [b, ...]``, traced once per
            ``cache_key`` and run under ``pmap`` (``batch`` is one device's share,
            ``rng`` differs per batch and device).
          args: broadcast to every device (variables, budgets: traced, so a new value
            does not recompile).
          cache_key: names the compiled program (include everything static in ``fn``).
          rng: the base key; batch ``i`` uses ``fold_in(rng, i)``.
          transform: optional host-side ``transform(images [n, H, W, C], i)`` applied to
            each batch's images before ``fn``; it may return frames ``[F, n, H, W, C]``, in
            which case ``fn`` runs once per frame and the values are ``[F, N, ...]``.

        Returns:
          The pytree of ``fn``'s outputs, ``[N, ...]`` over this process's real examples in
          split order (``[F, N, ...]`` with frames).
        """
        program = self._program(cache_key, fn)
        chunks, framed = [], False
        for i, batch in enumerate(self.batches()):
            key = jax.random.fold_in(rng, i)
            mask = batch["mask"].reshape(-1)
            if transform is None:
                out = self._fetch(program(args, batch, key))
                chunks.append(jax.tree.map(lambda v, m=mask: v[m], out))
                continue
            shape = batch["image"].shape
            flat = batch["image"].reshape((-1,) + shape[2:])
            images = np.asarray(transform(flat, i))
            framed = images.ndim == flat.ndim + 1
            frames = images if framed else images[None]
            outs = [self._fetch(program(args, dict(batch, image=f.reshape(shape)), key))
                    for f in frames]
            out = jax.tree.map(lambda *v: np.stack(v), *outs)
            keep = (slice(None), mask) if framed else (0, mask)
            chunks.append(jax.tree.map(lambda v, k=keep: v[k], out))
        if not chunks:
            raise ValueError("evaluation split is empty")
        axis = 1 if framed else 0
        return jax.tree.map(lambda *v: np.concatenate(v, axis=axis), *chunks)

    def total(self, values: np.ndarray | float) -> float:
        """The sum of ``values`` (this process's per-example values, or their sum) over
        every process."""
        local = float(np.sum(np.asarray(values, np.float64)))
        if self.devices is None and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return float(np.sum(multihost_utils.process_allgather(np.float64(local))))
        return local

    def mean(self, values: np.ndarray) -> float:
        """``total(values) / num_examples``: a per-example mean over the whole split."""
        return self.total(values) / self.num_examples


def padded_batches(images: np.ndarray, labels: np.ndarray, per_device: int,
                   num_devices: int) -> list[Batch]:
    """Float ``images`` ``[n, H, W, C]`` and ``labels`` in batches ``[num_devices,
    per_device, ...]``, the last one padded (``mask`` False on the padding)."""
    n, step = len(images), per_device * num_devices
    out = []
    for start in range(0, n, step):
        idx = np.arange(start, start + step)
        mask = idx < n
        idx = np.where(mask, idx, 0)
        out.append({"image": images[idx].reshape((num_devices, per_device) + images.shape[1:]),
                    "label": labels[idx].reshape(num_devices, per_device),
                    "mask": mask.reshape(num_devices, per_device)})
    return out


def correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example top-1 correctness ``[B]`` (bool) of ``logits`` ``[B, K]``."""
    return jax.numpy.argmax(logits, -1) == labels


def predictions(runner: Runner, model: Model,
                transform: Callable[[np.ndarray, int], Any] | None = None) -> np.ndarray:
    """Top-1 predictions ``[N]`` of ``model`` (``[F, N]`` when ``transform`` gives frames),
    after the host-side ``transform`` of :meth:`Runner.map`."""
    apply_fn = model.apply_fn

    def fn(variables, batch, rng):
        del rng
        return Model.logits(apply_fn, variables)(batch["image"]).argmax(-1)

    return runner.map(fn, model.variables, cache_key=("predict", model.arch),
                      rng=runner.key("predict"), transform=transform)
