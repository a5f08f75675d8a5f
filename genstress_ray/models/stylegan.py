"""A small conditional style-based GAN (StyleGAN2's shape, scaled to 28x28/32x32 and a CPU).

The generator has StyleGAN2's public surface, so the pipeline treats it exactly like a user's
pretrained StyleGAN2/3 generator: ``mapping(z, c) -> ws`` (N, num_ws, w_dim), ``synthesis(ws) ->
images`` in [-1, 1], ``z_dim``, ``c_dim``, ``w_dim``, ``num_ws`` and a tracked ``w_avg``.

- Mapping: z and a class embedding, each normalised by its second moment, concatenated, then an MLP.
- Synthesis: a learned constant at H/4, then three resolutions (H/4, H/2, H), two modulated 3x3
  convolutions each (weight demodulation as in StyleGAN2), and a modulated 1x1 to-image layer:
  ``num_ws`` = 7 style inputs, coarse (0-1), middle (2-3), fine (4-6). No per-pixel noise inputs, so an
  image is a deterministic function of its styles.
- Discriminator: strided convolutions, a minibatch standard-deviation feature, and a projection
  head for the class (Miyato & Koyama), plus an auxiliary classifier head (AC-GAN) that pushes the
  generator toward images of their conditioning class.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from genstress_ray.models.registry import register_model


def _normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


class MappingNetwork(nn.Module):
    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int, layers: int = 4, w_avg_beta: float = 0.995):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws, self.w_avg_beta = z_dim, c_dim, w_dim, num_ws, w_avg_beta
        self.embed = nn.Linear(c_dim, w_dim) if c_dim else None
        dims = [z_dim + (w_dim if c_dim else 0)] + [w_dim] * layers
        self.net = nn.Sequential(*[m for i in range(layers) for m in (nn.Linear(dims[i], dims[i + 1]), nn.LeakyReLU(0.2))])
        # Variance-preserving init: PyTorch's default shrinks the variance about sixfold per layer, and
        # after four layers w hardly depends on z, so the generator learns to ignore it (one image per class).
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight, a=0.2)
                nn.init.zeros_(layer.bias)
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, truncation_psi: float = 1.0) -> torch.Tensor:
        x = _normalize_2nd_moment(z)
        if self.embed is not None:
            x = torch.cat([x, _normalize_2nd_moment(self.embed(c.float()))], dim=1)
        w = self.net(x)
        if self.training:  # track the average w, as StyleGAN2 does, for truncation
            self.w_avg.copy_(w.detach().mean(0).lerp(self.w_avg, self.w_avg_beta))
        if truncation_psi != 1:
            w = self.w_avg.lerp(w, truncation_psi)
        return w.unsqueeze(1).repeat(1, self.num_ws, 1)


class ModulatedConv(nn.Module):
    """A convolution whose input channels are scaled by a style (an affine map of w), then demodulated.

    Modulating activations instead of weights is the same operation as StyleGAN2's (its non-fused
    path) and runs as one ordinary batched convolution, which is faster on CPUs than grouped convs.
    """

    def __init__(self, w_dim: int, in_ch: int, out_ch: int, kernel: int, demodulate: bool = True, activate: bool = True):
        super().__init__()
        self.affine = nn.Linear(w_dim, in_ch)
        nn.init.normal_(self.affine.weight, std=1 / math.sqrt(w_dim))  # styles vary with w from the start
        nn.init.ones_(self.affine.bias)
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.scale = 1 / math.sqrt(in_ch * kernel * kernel)
        self.demodulate, self.activate, self.padding = demodulate, activate, kernel // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        style = self.affine(w)  # (N, in)
        weight = self.weight * self.scale
        x = F.conv2d(x * style[:, :, None, None], weight, padding=self.padding)
        if self.demodulate:
            d = (weight.square().sum(dim=(2, 3))[None] * style.square()[:, None, :]).sum(2).add(1e-8).rsqrt()
            x = x * d[:, :, None, None]
        x = x + self.bias[None, :, None, None]
        return F.leaky_relu(x, 0.2) * math.sqrt(2) if self.activate else x


class SynthesisNetwork(nn.Module):
    def __init__(self, w_dim: int, img_channels: int, img_size: int, channels=(128, 64, 32)):
        super().__init__()
        base = img_size // 4
        self.base = base
        self.const = nn.Parameter(torch.randn(channels[0], base, base))
        convs, in_ch = [], channels[0]
        for ch in channels:
            convs += [ModulatedConv(w_dim, in_ch, ch, 3), ModulatedConv(w_dim, ch, ch, 3)]
            in_ch = ch
        self.convs = nn.ModuleList(convs)
        self.to_image = ModulatedConv(w_dim, in_ch, img_channels, 1, demodulate=False, activate=False)
        self.num_ws = len(convs) + 1

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        x = self.const.unsqueeze(0).expand(len(ws), -1, -1, -1)
        for i, conv in enumerate(self.convs):
            if i and i % 2 == 0:  # each resolution after the first starts with a 2x upsample
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = conv(x, ws[:, i])
        return self.to_image(x, ws[:, -1])


class SmallStyleGAN(nn.Module):
    """``mapping`` + ``synthesis``, the StyleGAN2 surface (see the module docstring)."""

    def __init__(self, in_shape=(1, 28, 28), num_classes: int = 10, z_dim: int = 64, w_dim: int = 64,
                 mapping_layers: int = 4, channels=(128, 64, 32)):
        super().__init__()
        c, h, w = (int(s) for s in in_shape)
        if h != w or h % 4:
            raise ValueError(f"in_shape {in_shape}: images must be square with a side divisible by 4; resize them "
                             "(genstress train --resize, or data.resize in a config)")
        self.synthesis = SynthesisNetwork(w_dim, c, h, tuple(channels))
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, num_classes, w_dim, self.num_ws, mapping_layers)
        self.z_dim, self.c_dim, self.w_dim = z_dim, num_classes, w_dim

    @property
    def w_avg(self) -> torch.Tensor:
        return self.mapping.w_avg

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, truncation_psi: float = 1.0) -> torch.Tensor:
        return self.synthesis(self.mapping(z, c, truncation_psi))


class StyleDiscriminator(nn.Module):
    """Real/fake score with a class projection, plus class logits for the auxiliary classifier loss."""

    def __init__(self, in_shape=(1, 28, 28), num_classes: int = 10, channels=(32, 64, 128), hidden: int = 128):
        super().__init__()
        c, h, _ = (int(s) for s in in_shape)
        layers, in_ch = [], c
        for i, ch in enumerate(channels):
            layers += [nn.Conv2d(in_ch, ch, 3, stride=1 if i == 0 else 2, padding=1), nn.LeakyReLU(0.2)]
            in_ch = ch
        self.features = nn.Sequential(*layers)
        side = h // 4
        self.head = nn.Sequential(nn.Flatten(), nn.Linear((in_ch + 1) * side * side, hidden), nn.LeakyReLU(0.2))
        self.score = nn.Linear(hidden, 1)
        self.project = nn.Embedding(num_classes, hidden) if num_classes else None
        self.classes = nn.Linear(hidden, num_classes) if num_classes else None

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        f = self.features(x)
        # Minibatch standard deviation (StyleGAN): +eps keeps its gradient finite when a feature is constant.
        std = (f.var(dim=0, unbiased=False) + 1e-8).sqrt().mean().expand(len(f), 1, *f.shape[2:])
        h = self.head(torch.cat([f, std], dim=1))
        score = self.score(h).squeeze(1)
        if self.project is None:
            return score, None
        labels = c.argmax(1)
        return score + (self.project(labels) * h).sum(1), self.classes(h)


@register_model("small_stylegan", kind="style_generator")
def small_stylegan(**params) -> SmallStyleGAN:
    """The built-in small conditional style-based GAN generator (``num_ws`` = 7)."""
    return SmallStyleGAN(**params)
