"""The small models the project trains itself: the Defuse CNN classifier and beta-VAE.

Both follow the shapes of the Defuse paper's MNIST models: a two-block conv classifier, and a
beta-VAE with a strided-conv encoder / transposed-conv decoder (Burgess et al.'s layout, scaled to
28x28) and a 10-dimensional latent. Both take any (C, H, W): sides that 4 does not divide are pooled
with ceil mode (the CNN) or padded by edge replication and cropped back (the VAE), so 28x28 models
are exactly what they were and GTSRB's 35x35 needs no resize.
"""

from __future__ import annotations

import torch
from torch import nn

from genstress_ray.models.registry import register_model


def _check_shape(in_shape) -> tuple[int, int, int]:
    try:
        c, h, w = (int(s) for s in in_shape)
    except (TypeError, ValueError):
        raise ValueError(f"in_shape must be (channels, height, width), got {in_shape!r}") from None
    if min(c, h, w) < 1:
        raise ValueError(f"in_shape must be positive, got {in_shape!r}")
    return c, h, w


def _quarter(side: int) -> int:
    """The side after two halvings that round up (ceil-mode pooling, or padding to a multiple of 4)."""
    return -(-side // 4)


class SmallCNN(nn.Module):
    def __init__(self, in_shape=(1, 28, 28), num_classes: int = 10, width: int = 32, hidden: int = 128):
        super().__init__()
        c, h, w = _check_shape(in_shape)
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(2 * width * _quarter(h) * _quarter(w), hidden), nn.ReLU(),
            nn.Dropout(0.5), nn.Linear(hidden, num_classes),
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, for diversity and Frechet distances."""
        return self.head[:-2](self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BetaVAE(nn.Module):
    def __init__(self, in_shape=(1, 28, 28), latent_dim: int = 10, width: int = 32, hidden: int = 256):
        super().__init__()
        c, h, w = _check_shape(in_shape)
        self.latent_dim = latent_dim
        self.image_size = (c, h, w)  # its native resolution: data of another is resized to it and back
        self._size = (h, w)
        self._grid = (width, _quarter(h), _quarter(w))
        flat = width * _quarter(h) * _quarter(w)
        self.encoder = nn.Sequential(
            nn.Conv2d(c, width, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 4, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 2 * latent_dim),
        )
        self.decoder_fc = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, flat), nn.ReLU(),
        )
        self.decoder_conv = nn.Sequential(
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(width, c, 4, stride=2, padding=1),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (h, w), (_, gh, gw) = self._size, self._grid
        if (4 * gh, 4 * gw) != (h, w):
            x = nn.functional.pad(x, (0, 4 * gw - w, 0, 4 * gh - h), mode="replicate")
        mean, log_var = self.encoder(x).chunk(2, dim=1)
        return mean, log_var

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        h, w = self._size
        return self.decoder_conv(self.decoder_fc(z).view(-1, *self._grid))[..., :h, :w]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(z))


@register_model("small_cnn", kind="classifier")
def small_cnn(**params) -> SmallCNN:
    """The Defuse-style small CNN classifier."""
    return SmallCNN(**params)


@register_model("beta_vae", kind="latent_generator")
def beta_vae(**params) -> BetaVAE:
    """The Defuse-style beta-VAE (latent 10 by default)."""
    return BetaVAE(**params)
