"""Projection heads that bring tower features into the shared CLIP space.

``linear`` and ``mlp`` follow CLIP (Radford et al. 2021); ``mi_linear`` is the
CLIP-Lite block CellWhisperer uses (Shrivastava et al. 2023; seed 000 §3.2):
Linear (no bias) -> BatchNorm1d -> ReLU -> Linear, plus a linear shortcut,
summed and layer-normalised.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["MILinearBlock", "MLPHead", "build_head", "HEAD_TYPES"]

#: Projection head types of :func:`build_head`.
HEAD_TYPES = ("linear", "mlp", "mi_linear")


class MILinearBlock(nn.Module):
    """CLIP-Lite projection block (the heads of CellWhisperer).

    Parameters
    ----------
    in_features
        Width of the tower features.
    out_features
        Width of the shared space (2,048 in CellWhisperer).

    Notes
    -----
    Submodule names (``feature_nonlinear.{0,1,3}``, ``feature_shortcut``, ``feature_block_ln``) match the
    published checkpoint layout, so its tensors load by name. BatchNorm makes the output depend on the
    mode: inference always runs in ``eval()``.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.feature_nonlinear = nn.Sequential(
            nn.Linear(in_features, out_features, bias=False),
            nn.BatchNorm1d(out_features),
            nn.ReLU(),
            nn.Linear(out_features, out_features),
        )
        self.feature_shortcut = nn.Linear(in_features, out_features)
        self.feature_block_ln = nn.LayerNorm(out_features)
        with torch.no_grad():  # near-identity shortcut, as in CLIP-Lite
            w = torch.empty(out_features, in_features).uniform_(-0.01, 0.01)
            k = min(in_features, out_features)
            w[torch.arange(k), torch.arange(k)] = 1.0
            self.feature_shortcut.weight.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(batch, in_features)`` to ``(batch, out_features)``."""
        return self.feature_block_ln(self.feature_nonlinear(x) + self.feature_shortcut(x))


class MLPHead(nn.Module):
    """Two-layer GELU projection with a linear shortcut and LayerNorm."""

    def __init__(self, in_features: int, out_features: int, hidden: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = hidden or out_features
        self.shortcut = nn.Linear(in_features, out_features, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_features)
        )
        self.norm = nn.LayerNorm(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(batch, in_features)`` to ``(batch, out_features)``."""
        return self.norm(self.shortcut(x) + self.mlp(x))


def build_head(config: dict, in_features: int, out_features: int) -> nn.Module:
    """Build a projection head from its config dict (``{"type": "linear"|"mlp"|"mi_linear", ...}``).

    Raises
    ------
    ConfigError
        For an unknown head type.
    """
    kind = config.get("type", "linear")
    if kind == "linear":
        return nn.Linear(in_features, out_features, bias=bool(config.get("bias", False)))
    if kind == "mlp":
        return MLPHead(in_features, out_features, hidden=config.get("hidden"), dropout=float(config.get("dropout", 0.0)))
    if kind == "mi_linear":
        return MILinearBlock(in_features, out_features)
    raise ConfigError("Unknown projection head type", found=repr(kind), expected="'linear', 'mlp' or 'mi_linear'")
