"""P-tuning (Liu et al., 2021, "GPT Understands, Too"): prompts produced by a trainable encoder.

p trainable inputs ``e`` ∈ ℝ^{p×d_model} (N(0, 1)) go through a prompt encoder and the result is put
before the input embeddings, as in prompt tuning. Encoders (Hugging Face PEFT's definitions, so that
the produced prompts are the same function of the same tensors):

- ``"mlp"``: Linear(d, h) → ReLU → Linear(h, h) → ReLU → Linear(h, d);
- ``"lstm"``: a 2-layer bidirectional LSTM (d → h per direction, ``dropout`` between layers) then
  Linear(2h, 2h) → ReLU → Linear(2h, d).

h = ``encoder_hidden_size`` (default d_model). Only the produced prompts are needed after training:
saving writes them (PEFT's ``prompt_embeddings``), ``tuned.finalize()`` folds the encoder away in
place, and an adapter read from a file holds the prompts alone (``folded=True``), trained directly if
training goes on. Not mergeable. Trainable numbers: p·d + the encoder while training, p·d kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.errors import ConfigError
from ...core.registry import register
from ...mechanisms.virtual import InputPromptAdapter, VirtualTokens, embedding_factory


@dataclass(kw_only=True)
class PTuning(VirtualTokens):
    """P-tuning. ``sp.PTuning(num_virtual_tokens=20, encoder="mlp")`` or ``encoder="lstm"``."""

    method = "p_tuning"
    peft_type = "P_TUNING"

    encoder: str = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.encoder not in ("mlp", "lstm"):
            raise ConfigError(f'PTuning.encoder must be "mlp" or "lstm", got {self.encoder!r}')
        if self.encoder_hidden_size is not None:
            self._check_positive_int("encoder_hidden_size")
        self._check_positive_int("encoder_num_layers")
        if self.encoder == "mlp" and self.encoder_num_layers != 2:
            raise ConfigError("PTuning: the MLP encoder has exactly 3 Linear layers; encoder_num_layers sets the "
                              f'LSTM depth only (got encoder_num_layers={self.encoder_num_layers} with encoder="mlp")')
        self._check_range("dropout", 0.0, 1.0)

    def to_peft_dict(self, layer_types: set[str] | frozenset[str] = frozenset()) -> dict[str, Any] | None:
        out = self._peft_common()
        if out is not None:
            out.update(encoder_reparameterization_type=self.encoder.upper(),
                       encoder_hidden_size=self.encoder_hidden_size or self.token_dim,
                       encoder_num_layers=self.encoder_num_layers, encoder_dropout=self.dropout)
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> PTuning:
        known = {"encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout"}
        encoder = str(data.get("encoder_reparameterization_type") or "MLP").lower()
        return cls(**cls._peft_fields(data, known), encoder=encoder,
                   encoder_hidden_size=data.get("encoder_hidden_size"),
                   encoder_num_layers=int(data.get("encoder_num_layers") or 2) if encoder == "lstm" else 2,
                   dropout=float(data.get("encoder_dropout") or 0.0))


class PromptEncoder(nn.Module):
    """e (p, d) → prompts (p, d) through an MLP or a BiLSTM + MLP (PEFT's P-tuning encoder)."""

    def __init__(self, d: int, hidden: int, kind: str, num_layers: int, dropout: float, **factory: Any) -> None:
        super().__init__()
        self.kind = kind
        if kind == "lstm":
            self.lstm_head = nn.LSTM(d, hidden, num_layers=num_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True, **factory)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **factory), nn.ReLU(),
                                          nn.Linear(2 * hidden, d, **factory))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, hidden, **factory), nn.ReLU(),
                                          nn.Linear(hidden, hidden, **factory), nn.ReLU(),
                                          nn.Linear(hidden, d, **factory))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        if self.kind == "lstm":
            e = self.lstm_head(e.unsqueeze(0))[0].squeeze(0)
        return self.mlp_head(e)


@register
class PTuningAdapter(InputPromptAdapter):
    config_cls = PTuning
    formula = "p·d_model + encoder (training); p·d_model kept"
    trains = "prompt encoder and its p inputs"

    def __init__(self, config: PTuning, model: nn.Module) -> None:
        super().__init__(config, model)
        factory = embedding_factory(model)
        p, d = config.num_virtual_tokens, config.token_dim
        if config.folded:
            self.prompt_embeddings = nn.Parameter(torch.zeros(p, d, **factory))
            return
        self.embedding = nn.Parameter(torch.randn(p, d, **factory))
        self.encoder = PromptEncoder(d, config.encoder_hidden_size or d, config.encoder, config.encoder_num_layers,
                                     config.dropout, **factory)

    def prompts(self) -> torch.Tensor:
        if self.config.folded:
            return self.prompt_embeddings
        return self.encoder(self.embedding)

    def _kept_prompts(self) -> torch.Tensor:
        """The prompts as kept: produced without dropout, detached."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self.prompts().detach().clone()
        finally:
            self.train(was_training)

    def file_state(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prompt_embeddings if self.config.folded else self._kept_prompts()}

    def file_config(self) -> PTuning:
        return self.config.replace(folded=True)

    def finalize(self) -> PTuning | None:
        """Fold the encoder away: keep only the prompts it produces now."""
        if self.config.folded:
            return None
        table = self._kept_prompts()
        del self.encoder
        del self.embedding
        self.prompt_embeddings = nn.Parameter(table)
        self.config = self.config.replace(folded=True)
        return self.config

    @classmethod
    def num_params(cls, config: PTuning, model: nn.Module) -> int:
        config = cls.prepare_config(config, model)
        p, d = config.num_virtual_tokens, config.token_dim
        if config.folded:
            return p * d
        h = config.encoder_hidden_size or d
        if config.encoder == "mlp":
            encoder = (d * h + h) + (h * h + h) + (h * d + d)
        else:
            lstm = sum(2 * (4 * h * ((d if i == 0 else 2 * h) + h) + 8 * h) for i in range(config.encoder_num_layers))
            encoder = lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)
        return p * d + encoder
