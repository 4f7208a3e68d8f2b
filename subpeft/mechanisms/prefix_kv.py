"""Prefix keys and values: p trainable slots in front of every attention layer's keys and values.

The kept tensor is one table ``(p, 2·L·d_kv)`` (d_kv = kv_heads · head_dim), laid out as PEFT's
``prompt_embeddings``: per virtual slot, layer 0's key, layer 0's value, layer 1's key, ... each
``(kv_heads, head_dim)``; optionally produced by a reparametrisation MLP while training. Prefix
tuning, P-tuning v2 and UniPELT build on :class:`PrefixKV`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError


def split_layers(table: torch.Tensor, num_layers: int, kv_heads: int, batch_size: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Table ``(p, 2·L·d_kv)`` → per-layer ``(key, value)``, each ``(batch, kv_heads, p, head_dim)``."""
    p = table.shape[0]
    per = table.view(p, 2 * num_layers, kv_heads, -1).permute(1, 2, 0, 3)  # (2L, heads, p, head_dim)
    return [(per[2 * i].unsqueeze(0).expand(batch_size, -1, -1, -1),
             per[2 * i + 1].unsqueeze(0).expand(batch_size, -1, -1, -1)) for i in range(num_layers)]


def join_layers(layers_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Inverse of :func:`split_layers` for one example: ``[(k, v)]`` with k ``(kv_heads, p, head_dim)``
    → the table ``(p, 2·L·d_kv)``."""
    per = torch.stack([t for kv in layers_kv for t in kv])  # (2L, heads, p, head_dim)
    return per.permute(2, 0, 1, 3).reshape(per.shape[2], -1)


class PrefixKV(nn.Module):
    """p prefix slots for every layer: the table ``(p, 2·L·d_kv)``, stored or produced by the
    reparametrisation MLP (``projection_dim``), and its per-layer keys/values."""

    def __init__(self, num_virtual: int, num_layers: int, kv_heads: int, head_dim: int, *, d_model: int | None = None,
                 projection_dim: int | None = None, **factory: Any) -> None:
        super().__init__()
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        width = 2 * num_layers * kv_heads * head_dim
        if projection_dim:
            if not d_model:
                raise ConfigError("the prefix reparametrisation needs d_model (the width of its p inputs)")
            self.embedding = nn.Parameter(torch.randn(num_virtual, d_model, **factory))
            self.transform = nn.Sequential(nn.Linear(d_model, projection_dim, **factory), nn.Tanh(),
                                           nn.Linear(projection_dim, width, **factory))
        else:
            self.prompt_embeddings = nn.Parameter(torch.randn(num_virtual, width, **factory))

    @property
    def reparametrised(self) -> bool:
        return hasattr(self, "transform")

    def table(self) -> torch.Tensor:
        return self.transform(self.embedding) if self.reparametrised else self.prompt_embeddings

    def kept_table(self) -> torch.Tensor:
        """The table as saved: the MLP's output (a detached copy) while reparametrised, else the parameter."""
        if self.reparametrised:
            with torch.no_grad():
                return self.table().detach().clone()
        return self.prompt_embeddings

    def layers_kv(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return split_layers(self.table(), self.num_layers, self.kv_heads, batch_size)

    def fold(self) -> None:
        """Replace the MLP by the table it produces now (the kept form)."""
        if not self.reparametrised:
            return
        table = self.kept_table()
        del self.transform
        del self.embedding
        self.prompt_embeddings = nn.Parameter(table)
