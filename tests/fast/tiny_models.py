"""Tiny hand-made models for the generic test matrix: one per supported layer type.

Each case builds a seeded model, names the modules to adapt, and makes an input. Layer sizes are
distinct on purpose (d_in ≠ d_out) so that a transposed factor or a swapped side fails loudly.

Models and inputs go to ``DEVICE``: the environment variable ``SUBPEFT_TEST_DEVICE`` (``cpu`` by
default; ``benchmarks/gpu_check.sh`` runs the matrix with ``cuda``). Weights and inputs are drawn on
the CPU from the same seeds and then moved, so every device sees the same numbers. On CUDA, TF32 is
switched off so that float32 keeps the matrix's atol 1e-5.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

DEVICE = torch.device(os.environ.get("SUBPEFT_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda":
    if not torch.cuda.is_available():
        raise RuntimeError("SUBPEFT_TEST_DEVICE=cuda but torch.cuda.is_available() is False")
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 rounds float32 GEMMs/convs to 10 mantissa bits
    torch.backends.cudnn.allow_tf32 = False


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(10, 7)
        self.head = nn.Linear(7, 3, bias=False)

    def forward(self, x):
        return self.head(self.fc2(self.act(self.fc1(x))))


class TinyAttention(nn.Module):
    """One pre-norm self-attention block with an FFN, q/k/v/o and up/down projections."""

    def __init__(self, d: int = 8, heads: int = 2, ffn: int = 12) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)
        self.up_proj = nn.Linear(d, ffn)
        self.down_proj = nn.Linear(ffn, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm(x)

        def split(z):
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        att = torch.nn.functional.scaled_dot_product_attention(split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h)))
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down_proj(torch.relu(self.up_proj(x)))


class GPT2Style(nn.Module):
    """transformers' Conv1D layers (weights stored transposed, as in GPT-2)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_attn = Conv1D(9, 6)  # nf=9 (out), nx=6 (in)
        self.c_proj = Conv1D(5, 9)

    def forward(self, x):
        return self.c_proj(torch.tanh(self.c_attn(x)))


class EmbeddingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6, padding_idx=0)
        self.proj = nn.Linear(6, 4)

    def forward(self, ids):
        return self.proj(self.emb(ids))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 4, 1)
        self.conv3 = nn.Conv2d(4, 2, (3, 2), stride=2, dilation=(1, 2), bias=False)

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


class NormNet(nn.Module):
    """LayerNorm and RMSNorm between linears (for LayerNorm tuning and BitFit on norms)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8, eps=1e-6)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.rms(torch.relu(self.ln(self.fc(x)))))


@dataclass
class Case:
    name: str
    layer_type: str
    build: Callable[[], nn.Module]
    targets: list[str]
    make_input: Callable[[], torch.Tensor]

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().to(DEVICE)

    def input(self, seed: int = 1) -> torch.Tensor:
        torch.manual_seed(seed)
        return self.make_input().to(DEVICE)


CASES = [
    Case("mlp", "linear", MLP, ["fc1", "fc2"], lambda: torch.randn(4, 6)),
    Case("attention", "linear", TinyAttention, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
         lambda: torch.randn(2, 5, 8)),
    Case("conv1d", "conv1d", GPT2Style, ["c_attn", "c_proj"], lambda: torch.randn(3, 4, 6)),
    Case("embedding", "embedding", EmbeddingModel, ["emb"], lambda: torch.tensor([[1, 2, 0, 19], [5, 0, 7, 7]])),
    Case("norm", "norm", NormNet, ["ln", "rms"], lambda: torch.randn(3, 5, 6)),
    Case("conv2d", "conv2d", ConvNet, ["conv1", "conv2", "conv3"], lambda: torch.randn(2, 3, 8, 9)),
]
