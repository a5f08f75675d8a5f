"""A user's own model, built through a ``package.module:function`` factory in tests."""

import torch
from torch import nn


def tiny_mlp(in_features: int = 64, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


class UserStyleGenerator(nn.Module):
    """Shaped like NVlabs' StyleGAN2/3 ``Generator`` where it matters here: ``mapping`` and ``synthesis``
    sub-modules, ``w_avg`` kept on the mapping network, ``z_dim``/``c_dim``/``num_ws``, images in [-1, 1].
    Unconditional, and its mapping returns one w per image (the adapter broadcasts it)."""

    def __init__(self, z_dim: int = 6, w_dim: int = 5, num_ws: int = 4, side: int = 8):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, 0, w_dim, num_ws
        self.mapping = _Mapping(z_dim, w_dim)
        self.synthesis = _Synthesis(w_dim, num_ws, side)


class _Mapping(nn.Module):
    def __init__(self, z_dim, w_dim):
        super().__init__()
        self.net = nn.Linear(z_dim, w_dim)
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z, c):
        return self.net(z)


class _Synthesis(nn.Module):
    def __init__(self, w_dim, num_ws, side):
        super().__init__()
        self.side = side
        self.out = nn.Linear(w_dim * num_ws, side * side)

    def forward(self, ws):
        return torch.tanh(self.out(ws.flatten(1))).view(-1, 1, self.side, self.side)


def user_style_generator(**params) -> nn.Module:
    return UserStyleGenerator(**params)
