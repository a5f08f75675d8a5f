"""A user's own model, built through a ``package.module:function`` factory in tests."""

from torch import nn


def tiny_mlp(in_features: int = 64, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
