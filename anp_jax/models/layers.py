"""Perturbation points: naming them, listing them, and choosing which ones ANP perturbs."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

PERTURBATIONS = "perturbations"
# The activation at every perturbation point before its noise is added, sown by ``perturb``
# when this collection is mutable (``apply(..., mutable=[ACTIVATIONS])``): {name: z}.
ACTIVATIONS = "activations"


class PerturbableModel(nn.Module):
    """Base of every model: named perturbation points, listed shallow to deep.

    Subclasses call ``self.perturb(name, z)`` at each point (Flax adds the matching entry
    of the ``perturbations`` collection to ``z`` when one is given, and is the identity
    otherwise) and list the names, input first, in :meth:`perturbation_points`.

    Attributes shared by every model: ``num_classes``; ``mean``/``std`` to standardise
    pixels inside the model; ``axis_name`` of pmap for cross-replica BatchNorm; ``dtype``
    of the computation (activations, and so the noise registers).
    """

    num_classes: int = 10
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    axis_name: str | None = None
    dtype: jnp.dtype = jnp.float32

    def perturbation_points(self) -> tuple[str, ...]:
        raise NotImplementedError

    def perturb(self, name: str, value: jnp.ndarray,
                collection: str = PERTURBATIONS) -> jnp.ndarray:
        """Returns ``value`` plus the noise ``collection[name]``, if that entry is given.

        Unlike Flax's ``Module.perturb``, a collection that holds only some of the points
        is allowed: the others are left untouched (and cost nothing).  At ``init`` with a
        mutable collection, zeros shaped like ``value`` are stored for every point.  When
        the ``ACTIVATIONS`` collection is mutable, ``value`` itself (before the noise) is
        sown there under ``name`` (not at ``init``).
        """
        if not self.is_initializing():
            self.sow(ACTIVATIONS, name, value, init_fn=lambda: None, reduce_fn=lambda _, v: v)
        if self.is_mutable_collection(collection) and not self.has_variable(collection, name):
            self.put_variable(collection, name, jnp.zeros_like(value))
        if self.has_variable(collection, name):
            value = value + self.get_variable(collection, name).astype(value.dtype)
        return value

    def normalize_input(self, x: jnp.ndarray) -> jnp.ndarray:
        """Standardises pixels inside the model, so attack budgets stay in pixel units."""
        if self.mean is not None:
            x = x - jnp.asarray(self.mean, x.dtype)
        if self.std is not None:
            x = x / jnp.asarray(self.std, x.dtype)
        return x


def select_layers(spec: str | Sequence[str | int], points: Sequence[str],
                  model_name: str = "model") -> tuple[str, ...]:
    """Resolves a layer selection to perturbation point names, in model order.

    ``spec`` is one of: ``"all"``; ``"none"`` or ``""``; ``"shallow N"`` (the first N
    points, the input included); ``"deep N"`` (the last N); a comma-separated string or a
    sequence of names and/or indices into ``points`` (``"0,1"`` as in the official code,
    ``"input,conv1"``).  Raises ``ValueError`` naming any unknown point.
    """
    points = tuple(points)
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return points
        if text in ("", "none"):
            return ()
        words = text.split()
        if len(words) == 2 and words[0] in ("shallow", "deep"):
            try:
                n = int(words[1])
            except ValueError:
                raise ValueError(f"layer selection {spec!r}: expected '{words[0]} N' "
                                 "with an integer N") from None
            if not 1 <= n <= len(points):
                raise ValueError(f"layer selection {spec!r}: N must be in 1..{len(points)} "
                                 f"for {model_name}")
            return points[:n] if words[0] == "shallow" else points[-n:]
        items: Sequence[str | int] = [w.strip() for w in spec.split(",") if w.strip()]
    else:
        items = list(spec)
    chosen = set()
    for item in items:
        if isinstance(item, int) or (isinstance(item, str) and item.lstrip("-").isdigit()):
            index = int(item)
            if not 0 <= index < len(points):
                raise ValueError(f"unknown perturbation point index {index} for {model_name}: "
                                 f"valid indices are 0..{len(points) - 1}")
            chosen.add(points[index])
        elif item in points:
            chosen.add(item)
        else:
            raise ValueError(f"unknown perturbation point {item!r} for {model_name}; "
                             f"choose from: {', '.join(points)}")
    return tuple(p for p in points if p in chosen)
