"""The generator of data-free distillation: noise ``z`` -> an image batch shaped like the teacher's inputs.

The architecture is DAFL's (Chen et al. 2019, also used by DFAD): a linear layer to a ``128 x s/4 x s/4`` map,
two (upsample x2, 3x3 conv, BatchNorm, LeakyReLU 0.2) stages, a 3x3 conv to the image channels, ``tanh`` and a
final affine-free BatchNorm (DAFL's released code; it keeps the generated batch normalised like the teacher's
inputs). ``image_size`` must be divisible by 4 (8 for digits, 32 for CIFAR).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class Generator(nn.Module):
    def __init__(self, latent_dim: int = 100, channels: int = 3, image_size: int = 32, width: int = 128):
        super().__init__()
        if image_size % 4 or image_size < 4:
            raise ValueError(f"generator image_size must be a multiple of 4 (two x2 upsamplings), got {image_size}")
        self.latent_dim, self.channels, self.image_size = latent_dim, channels, image_size
        self.init_size = image_size // 4
        self.project = nn.Sequential(nn.Linear(latent_dim, width * self.init_size ** 2))
        self.width = width
        self.body = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width // 2, 3, padding=1),
            nn.BatchNorm2d(width // 2),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width // 2, channels, 3, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(z.shape[0], self.width, self.init_size, self.init_size)
        return self.body(x)

    def sample(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Noise for one batch: ``N(0, 1)`` of shape ``[batch, latent_dim]`` (a per-worker seeded ``generator``
        makes each data-parallel worker explore other samples)."""
        return torch.randn(batch, self.latent_dim, generator=generator, device=device)


def check_generator(generator: nn.Module, input_shape: tuple[int, ...], latent_dim: int) -> None:
    """One line when the generator's images are not the teacher's inputs (checked on a batch of 2, before any
    training): ``input_shape`` is the teacher's ``(channels, height, width)``."""
    was_training = generator.training
    generator.eval()
    try:
        with torch.no_grad():
            shape = tuple(generator(torch.zeros(2, latent_dim)).shape[1:])
    finally:
        generator.train(was_training)
    if shape != tuple(input_shape):
        raise ValueError(f"the generator makes images of shape {shape}, but the teacher takes {tuple(input_shape)}; "
                         f"set the generator's channels / image_size to the dataset's")
