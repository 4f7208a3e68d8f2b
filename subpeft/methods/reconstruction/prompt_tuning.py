"""Prompt tuning (Lester et al., 2021): p trainable vectors put before the input embeddings.

The model sees ``[P; E(x)]`` with P ∈ ℝ^{p×d_model} trained and every weight frozen: p·d_model
trainable numbers, not mergeable. Init (``init``): ``"vocab"`` (default, the paper's recommendation)
copies the embeddings of p token ids drawn uniformly from the vocabulary; ``"text"`` the embeddings of
``init_text``'s tokens (without special tokens, repeated or cut to p), tokenized with ``tokenizer`` (a
name or path for ``AutoTokenizer``; default: the model's own ``name_or_path``); ``"random"`` draws
N(0, 1) as PEFT's ``RANDOM``. Where the prompts go and how masks, positions, labels and generation
are handled: :mod:`subpeft.core.prompt`. Files are PEFT's ``PROMPT_TUNING`` format (``prompt_embeddings``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.errors import ConfigError
from ...core.registry import register
from ...mechanisms.virtual import InputPromptAdapter, VirtualTokens, embedding_factory

_PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


@dataclass(kw_only=True)
class PromptTuning(VirtualTokens):
    """Prompt tuning. ``sp.PromptTuning(num_virtual_tokens=20, init="vocab")``;
    ``init="text", init_text="Classify the sentiment:"`` starts from a text's embeddings."""

    method = "prompt_tuning"
    peft_type = "PROMPT_TUNING"

    init: str = "vocab"
    init_text: str | None = None
    tokenizer: str | None = None

    def validate(self) -> None:
        super().validate()
        if self.init not in _PEFT_INIT:
            raise ConfigError(f"PromptTuning.init must be one of {sorted(_PEFT_INIT)}, got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise ConfigError('PromptTuning(init="text") needs init_text, the text whose embeddings start the prompt')

    def to_peft_dict(self, layer_types: set[str] | frozenset[str] = frozenset()) -> dict[str, Any] | None:
        out = self._peft_common()
        if out is not None:
            out.update(prompt_tuning_init=_PEFT_INIT[self.init], prompt_tuning_init_text=self.init_text,
                       tokenizer_name_or_path=self.tokenizer, tokenizer_kwargs=None)
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> PromptTuning:
        known = {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"}
        init = {v: k for k, v in _PEFT_INIT.items()}.get(str(data.get("prompt_tuning_init") or "RANDOM"), "random")
        text = data.get("prompt_tuning_init_text")
        return cls(**cls._peft_fields(data, known), init=init if init != "text" or text else "random",
                   init_text=text, tokenizer=data.get("tokenizer_name_or_path"))


def _text_ids(config: PromptTuning, model: nn.Module, p: int) -> list[int]:
    source = config.tokenizer or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not source:
        raise ConfigError('PromptTuning(init="text") needs tokenizer= (a name or path for AutoTokenizer): the model '
                          "does not say where its tokenizer is")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f'PromptTuning(init="text"): cannot load the tokenizer {source!r}: {exc}') from None
    ids = tok(config.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"PromptTuning.init_text {config.init_text!r} gives no tokens")
    return (ids * math.ceil(p / len(ids)))[:p]


@register
class PromptTuningAdapter(InputPromptAdapter):
    config_cls = PromptTuning
    formula = "p·d_model"
    trains = "p input prompt vectors"

    def __init__(self, config: PromptTuning, model: nn.Module) -> None:
        super().__init__(config, model)
        p, d = config.num_virtual_tokens, config.token_dim
        self.prompt_embeddings = nn.Parameter(torch.zeros(p, d, **embedding_factory(model)))
        if config.folded:
            return  # the values come from a file
        emb = model.get_input_embeddings()
        with torch.no_grad():
            if config.init == "random":
                self.prompt_embeddings.normal_()
            else:
                ids = (torch.randint(0, emb.num_embeddings, (p,)).tolist() if config.init == "vocab"
                       else _text_ids(config, model, p))
                ids = torch.tensor(ids, dtype=torch.long, device=emb.weight.device)
                self.prompt_embeddings.copy_(emb(ids).detach())

    def prompts(self) -> torch.Tensor:
        return self.prompt_embeddings

    @classmethod
    def num_params(cls, config: PromptTuning, model: nn.Module) -> int:
        config = cls.prepare_config(config, model)
        return config.num_virtual_tokens * config.token_dim
