"""The small models the project trains itself: the Defuse CNN classifier and beta-VAE.

Both follow the shapes of the Defuse paper's MNIST models: a two-block conv classifier, and a
beta-VAE with a strided-conv encoder / transposed-conv decoder (Burgess et al.'s layout, scaled to
28x28) and a 10-dimensional latent. Both take any (C, H, W) with H and W divisible by 4.
"""

from __future__ import annotations

import torch
from torch import nn

from genstress_ray.models.registry import register_model


def _check_shape(in_shape) -> tuple[int, int, int]:
    c, h, w = (int(s) for s in in_shape)
    if h % 4 or w % 4:
        raise ValueError(f"images of {h}x{w}: height and width must be divisible by 4; resize them "
                         f"(genstress train --resize {-(-max(h, w) // 4) * 4}, or data.resize in a config)")
    return c, h, w


class SmallCNN(nn.Module):
    def __init__(self, in_shape=(1, 28, 28), num_classes: int = 10, width: int = 32, hidden: int = 128):
        super().__init__()
        c, h, w = _check_shape(in_shape)
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(2 * width * (h // 4) * (w // 4), hidden), nn.ReLU(),
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
        self._grid = (width, h // 4, w // 4)
        flat = width * (h // 4) * (w // 4)
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
        mean, log_var = self.encoder(x).chunk(2, dim=1)
        return mean, log_var

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder_conv(self.decoder_fc(z).view(-1, *self._grid))

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
