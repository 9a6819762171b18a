"""A small CNN for 28x28 / 32x32 images (MNIST, Fashion-MNIST, emoji renders) and a SimCLR-style projection head."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["SmallConvNet", "ProjectionHead"]


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'group' or 'none', got {kind!r}")


class SmallConvNet(nn.Module):
    """``num_blocks`` blocks of [conv3x3 -> norm -> ReLU -> conv3x3 -> norm -> ReLU -> maxpool 2x2] with widths
    ``width, 2*width, 4*width, 4*width``, global average pooling, then a linear layer to ``embed_dim``.

    Input ``[B, in_channels, H, W]`` (H, W >= 2**num_blocks; made for 28x28 and 32x32), output ``[B, embed_dim]``
    un-normalized embeddings. ``embed_dim=None`` drops the final linear layer: the output is the pooled feature
    vector of size :attr:`feature_dim` (``4 * width`` for 3 or 4 blocks). ``norm="group"`` avoids batch statistics
    (useful with tiny or per-rank batches).
    """

    def __init__(self, in_channels: int = 1, embed_dim: int | None = 128, width: int = 32, num_blocks: int = 3,
                 norm: str = "batch", dropout: float = 0.0):
        super().__init__()
        if not 1 <= num_blocks <= 4:
            raise ValueError(f"num_blocks must be in 1..4, got {num_blocks}")
        widths = [width, 2 * width, 4 * width, 4 * width][:num_blocks]
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out in widths:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none"), _norm(norm, c_out),
                       nn.ReLU(inplace=True),
                       nn.Conv2d(c_out, c_out, 3, padding=1, bias=norm == "none"), _norm(norm, c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.feature_dim = c_in
        self.embed_dim = embed_dim if embed_dim is not None else c_in
        self.fc = nn.Linear(c_in, embed_dim) if embed_dim is not None else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, feature_dim]`` before the final linear layer."""
        if x.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
        return self.pool(self.features(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.forward_features(x)))


class ProjectionHead(nn.Module):
    """MLP projection head (SimCLR): ``num_layers`` linear layers with BatchNorm + ReLU between them.

    ``[B, in_dim] -> [B, out_dim]``; ``num_layers=1`` is a single linear map. The contrastive loss is applied to
    the head's output while downstream evaluation usually uses the encoder's output before it.
    """

    def __init__(self, in_dim: int, out_dim: int = 128, hidden_dim: int | None = None, num_layers: int = 2,
                 batch_norm: bool = True):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        hidden_dim = hidden_dim or in_dim
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(d, hidden_dim, bias=not batch_norm)]
            if batch_norm:
                layers += [nn.BatchNorm1d(hidden_dim)]
            layers += [nn.ReLU(inplace=True)]
            d = hidden_dim
        layers.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
