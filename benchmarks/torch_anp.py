"""ANP in PyTorch, written the way the authors' code does it, as a speed reference.

This module is a benchmark baseline only: anp-jax does not depend on PyTorch, and nothing
here is imported unless PyTorch is installed.  ``python -m benchmarks.step_time --torch``
times it in the same run as the JAX steps.

The algorithm is the official one (see ``shared/ANP_SPEC.md``), in the authors' style:

* the model keeps one noise *buffer* per perturbation point (``register_buffer``), shaped
  like the activation, batch included, and created at the first forward pass;
* the forward pass adds ``(eps / k) * r_m`` to each perturbed activation ``z_m`` and calls
  ``z_m.retain_grad()`` on it, so that ``loss.backward()`` leaves ``dloss/dz_m`` in
  ``z_m.grad`` next to the parameter gradients;
* for each mini-batch the buffers are zeroed, then ``k`` progressive steps each do a
  forward pass, a backward pass, an optimizer step and the register update
  ``r_m <- alpha * r_m + g_m / ||g_m||_2`` (per example; a zero gradient gives zero).

Two models: the digits CNN (the architecture of ``anp_jax.models.small.DigitsCNN``, in
NCHW) and VGG-16 with BatchNorm (``anp_jax.models.vgg.VGG``; noise on the convolution
outputs before BatchNorm, as the official code does).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

MODELS = ("digits_cnn", "vgg16")
IMAGE_SHAPES = {"digits_cnn": (1, 8, 8), "vgg16": (3, 32, 32)}  # C, H, W
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M")
_TINY = 1e-12


class NoisyModel(nn.Module):
    """Base: the noise buffers ``r_<point>`` and the perturbed activations ``z_<point>``."""

    points: tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self.add_noise = False
        self.noise_scale = 0.0  # eps / k
        self.z: dict[str, torch.Tensor] = {}
        for name in self.points:
            self.register_buffer(f"r_{name}", None)

    def perturb(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """Adds ``(eps / k) * r`` to ``z`` and keeps it, with its gradient, for the update."""
        if not self.add_noise:
            return z
        r = getattr(self, f"r_{name}")
        if r is None or r.shape != z.shape:
            r = torch.zeros_like(z, memory_format=torch.contiguous_format).detach()
            setattr(self, f"r_{name}", r)
        z = z + self.noise_scale * r.to(z.dtype)
        z.retain_grad()
        self.z[name] = z
        return z

    def reset_noise(self) -> None:
        """Zeroes the registers: every mini-batch starts without noise."""
        for name in self.points:
            r = getattr(self, f"r_{name}")
            if r is not None:
                r.zero_()

    @torch.no_grad()
    def update_noise(self, alpha: float) -> None:
        """``r <- alpha * r + g / ||g||_2`` per example, from the retained gradients."""
        for name in self.points:
            z = self.z.get(name)
            if z is None or z.grad is None:
                continue
            g = z.grad
            norm = g.flatten(1).float().norm(dim=1).view(-1, *([1] * (g.dim() - 1)))
            direction = torch.where(norm > _TINY, g / norm.clamp_min(_TINY),
                                    torch.zeros_like(g))
            r = getattr(self, f"r_{name}")
            r.mul_(alpha).add_(direction.to(r.dtype))
        self.z = {}


class DigitsCNN(NoisyModel):
    """conv 3x3 (32) - conv 3x3 (64) - avg-pool 2 - dense 128 - dense 10; ReLUs; noise on
    the input and on each pre-activation output."""

    points = ("input", "conv1", "conv2", "fc1")

    def __init__(self, num_classes: int = 10, width: int = 32, in_channels: int = 1,
                 image_size: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        side = (image_size + 1) // 2
        self.fc1 = nn.Linear(2 * width * side * side, 4 * width)
        self.fc2 = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.perturb("input", x)
        x = F.relu(self.perturb("conv1", self.conv1(x)))
        x = F.relu(self.perturb("conv2", self.conv2(x)))
        x = F.avg_pool2d(x, 2, ceil_mode=True).flatten(1)
        x = F.relu(self.perturb("fc1", self.fc1(x)))
        return self.fc2(x)


class VGG(NoisyModel):
    """VGG-16 with BatchNorm; noise on the input and on the 13 convolution outputs before
    BatchNorm; global average pooling, dropout 0.3, linear classifier."""

    points = ("input",) + tuple(f"conv{i}" for i in range(1, 14))

    def __init__(self, num_classes: int = 10, config=VGG16, dropout: float = 0.3):
        super().__init__()
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.layout: list[str | int] = []
        channels = 3
        for c in config:
            if c == "M":
                self.layout.append("M")
                continue
            self.layout.append(len(self.convs))
            self.convs.append(nn.Conv2d(channels, int(c), 3, padding=1))
            self.norms.append(nn.BatchNorm2d(int(c), momentum=0.1, eps=1e-5))
            channels = int(c)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.perturb("input", x)
        for item in self.layout:
            if item == "M":
                x = F.max_pool2d(x, 2, ceil_mode=True)
                continue
            z = self.perturb(f"conv{item + 1}", self.convs[item](x))
            x = F.relu(self.norms[item](z))
        x = self.dropout(x.mean(dim=(2, 3)))
        return self.fc(x)


def create_model(name: str, num_classes: int = 10) -> NoisyModel:
    if name == "digits_cnn":
        return DigitsCNN(num_classes)
    if name == "vgg16":
        return VGG(num_classes)
    raise ValueError(f"no PyTorch ANP model {name!r}; choose from: {', '.join(MODELS)}")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Trainer:
    """Plain training (``anp=False``) or ANP with ``k`` progressive updates per mini-batch.

    ``run(n)`` trains on the same synthetic mini-batch ``n`` times and returns the
    wall-clock seconds, synchronised with the device; :attr:`k` updates per mini-batch.
    """

    def __init__(self, model_name: str = "digits_cnn", batch: int = 128, k: int = 1,
                 anp: bool = True, eps: float = 1.0, alpha: float = 0.5, lr: float = 0.01,
                 dtype: str = "float32", device: torch.device | str | None = None,
                 seed: int = 0):
        torch.manual_seed(seed)
        self.device = torch.device(device) if device is not None else default_device()
        self.model = create_model(model_name).to(self.device)
        self.model.train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9,
                                         weight_decay=5e-4)
        self.k, self.anp, self.eps, self.alpha = k, anp, eps, alpha
        self.autocast = dtype == "bfloat16"
        g = torch.Generator().manual_seed(seed)
        shape = (batch,) + IMAGE_SHAPES[model_name]
        self.x = torch.rand(shape, generator=g).to(self.device)
        self.y = torch.randint(0, 10, (batch,), generator=g).to(self.device)

    def train_batch(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One mini-batch: registers reset, then ``k`` updates (forward, backward,
        optimizer step, register update)."""
        model = self.model
        model.add_noise = self.anp
        model.noise_scale = self.eps / self.k
        model.reset_noise()
        loss_value = torch.zeros((), device=self.device)
        for _ in range(self.k):
            x_in = x.detach().requires_grad_(self.anp)  # the input is perturbation point 0
            with torch.autocast(self.device.type, dtype=torch.bfloat16,
                                enabled=self.autocast):
                logits = model(x_in)
            loss = F.cross_entropy(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.anp:
                model.update_noise(self.alpha)
            loss_value = loss_value + loss.detach()
        return loss_value / self.k

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, n: int) -> float:
        self.synchronize()
        start = time.perf_counter()
        loss = None
        for _ in range(n):
            loss = self.train_batch(self.x, self.y)
        if loss is not None:
            float(loss)
        self.synchronize()
        return time.perf_counter() - start


def time_per_update(model_name: str = "digits_cnn", batch: int = 128, k: int = 1,
                    anp: bool = True, iters: int = 10, repeats: int = 5, warmup: int = 3,
                    **kwargs) -> float:
    """Median wall-clock milliseconds per parameter update (a mini-batch makes ``k``)."""
    trainer = Trainer(model_name, batch, k, anp, **kwargs)
    trainer.run(warmup)
    times = sorted(trainer.run(iters) / (iters * k) for _ in range(repeats))
    return 1e3 * times[len(times) // 2]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="PyTorch ANP: milliseconds per update")
    parser.add_argument("--model", choices=MODELS, default="digits_cnn")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    for name, anp_on, k in (("plain", False, 1), ("anp_k1", True, 1), ("anp_k3", True, 3)):
        ms = time_per_update(args.model, args.batch, k, anp_on, iters=args.iters)
        print(f"{name:8s} {ms:9.3f} ms/update")
