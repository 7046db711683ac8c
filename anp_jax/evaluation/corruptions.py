"""Accuracy under the common corruptions of :mod:`anp_jax.corruptions`, grouped by family.

The corruptions are those of CIFAR-10-C / ImageNet-C (Hendrycks & Dietterich 2019), in their
families: noise, blur, weather and digital (the four extra corruptions of the paper's
appendix, speckle noise, Gaussian blur, spatter and saturate, in the family they belong to).
Each corruption id is ``name_severity``.  Corrupted images are made on the host side of the
runner (one compiled kernel per corruption serves its five severities) and classified by the
one prediction program; the random draws depend on the seed, the id and the batch only, so
two models see the same corrupted images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from anp_jax import corruptions
from anp_jax import data as data_lib
from anp_jax.evaluation.runner import Model, Runner, predictions

FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur"),
    "weather": ("snow", "frost", "fog", "brightness", "spatter"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression", "saturate"),
}
FAMILY_OF = {name: family for family, names in FAMILIES.items() for name in names}


def parse_corruption_id(corruption: str) -> tuple[str, int]:
    """``"gaussian_noise_3"`` -> ``("gaussian_noise", 3)``; ValueError if unknown."""
    name, _, severity = corruption.rpartition("_")
    if name not in corruptions.CORRUPTIONS or not severity.isdigit() \
            or not 1 <= int(severity) <= 5:
        raise ValueError(f"unknown corruption {corruption!r}: expected NAME_SEVERITY with "
                         f"severity 1..5 and NAME one of {', '.join(corruptions.CORRUPTIONS)}")
    return name, int(severity)


def by_family(names: Sequence[str]) -> list[str]:
    """``names`` ordered family by family (noise, blur, weather, digital)."""
    order = [n for family in FAMILIES.values() for n in family]
    return sorted(names, key=lambda n: order.index(n) if n in order else len(order))


class Evaluator:
    """Accuracy on each corruption id: ``{"gaussian_noise_3": accuracy, ...}``."""

    name = "corruptions"

    def __init__(self, runner: Runner, corruptions: Sequence[str] = ()):
        for cid in corruptions:
            parse_corruption_id(cid)
        self.runner, self.ids = runner, tuple(corruptions)

    def accuracy(self, model: Model, corruption: str) -> float:
        name, severity = parse_corruption_id(corruption)
        base = self.runner.key("corruption", corruption, data=True)

        def transform(x: np.ndarray, i: int) -> np.ndarray:
            import jax

            return np.asarray(corruptions.corrupt(name, x, severity,
                                                  jax.random.fold_in(base, i)))

        return self.runner.mean(predictions(self.runner, model, transform)
                                == self.runner.labels())

    def run(self, model: Model) -> Iterator[tuple[str, Any]]:
        """Yields ``accuracy``: ``{corruption id: accuracy}``."""
        yield "accuracy", {cid: self.accuracy(model, cid) for cid in self.ids}


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summary(accuracy: Mapping[str, float], clean: float, names: Sequence[str],
            severities: Sequence[int], baseline: Mapping[str, float] | None = None,
            baseline_clean: float | None = None) -> dict:
    """Errors per corruption (mean over severities), per family, mCE, and with a baseline
    the normalised mCE (mean over corruptions of sum_s E / sum_s E_base) and the relative mCE
    (mean of sum_s (E - E_clean) / sum_s (E_base - E_base_clean)); a corruption whose
    baseline denominator is not positive is left out of those means (value None)."""
    error = {}
    for name in names:
        errs = [1.0 - accuracy[f"{name}_{s}"] for s in severities]
        error[name] = sum(errs) / len(errs)
    families = {f: _mean([e for n, e in error.items() if FAMILY_OF.get(n) == f])
                for f in FAMILIES if any(FAMILY_OF.get(n) == f for n in error)}
    out: dict[str, Any] = {"accuracy": dict(accuracy), "severities": list(severities),
                           "error": error, "family_error": families,
                           "mce": _mean(list(error.values()))}
    if baseline is not None:
        normalized, relative = {}, {}
        for name in names:
            e = [1.0 - accuracy[f"{name}_{s}"] for s in severities]
            b = [1.0 - baseline[f"{name}_{s}"] for s in severities]
            normalized[name] = sum(e) / sum(b) if sum(b) > 0 else None
            num = sum(x - (1.0 - clean) for x in e)
            den = sum(x - (1.0 - baseline_clean) for x in b)
            relative[name] = num / den if den > 0 else None
        out["baseline_error"] = {n: sum(1.0 - baseline[f"{n}_{s}"] for s in severities)
                                 / len(severities) for n in names}
        out["baseline_clean_accuracy"] = baseline_clean
        out["normalized_error"] = normalized
        out["normalized_mce"] = _mean(list(normalized.values()))
        out["relative_error"] = relative
        out["relative_mce"] = _mean(list(relative.values()))
    return out


def tfds_accuracies(model: Model, names: Sequence[str], severities: Sequence[int],
                    make_runner: Callable[[np.ndarray, np.ndarray], Runner],
                    family: str = "cifar10_corrupted", data_dir: str | None = None) -> dict:
    """Accuracy on the corrupted test sets of TFDS (``family/<name>_<severity>``: for
    CIFAR-10 the original CIFAR-10-C images) that are prepared in ``data_dir``; the ids that
    are not are listed under ``unavailable`` (never downloaded here: the report must not
    depend on the network).  ``make_runner(uint8 images, labels)`` gives the runner of one
    set."""
    accuracy, unavailable = {}, []
    for name in names:
        for severity in severities:
            cid = f"{name}_{severity}"
            try:
                images, labels = data_lib.load_split(f"{family}/{cid}", "test", data_dir,
                                                     False)
            except data_lib.DatasetError:
                unavailable.append(cid)
                continue
            runner = make_runner(images, labels)
            accuracy[cid] = runner.mean(predictions(runner, model) == runner.labels())
    out: dict[str, Any] = {"dataset": family, "accuracy": accuracy, "unavailable": unavailable}
    if accuracy:
        out["mean_accuracy"] = sum(accuracy.values()) / len(accuracy)
    return out
