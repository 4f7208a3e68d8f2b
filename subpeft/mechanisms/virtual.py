"""What every prompt-kind method shares: the config fields, the model's dimensions, PEFT's file format.

A prompt-kind config records, beside its own options, the model dimensions that its tensors are
sized by (``token_dim``, ``num_layers``, ``num_attention_heads``) and the model's task
(``task_type``), filled in at attach from the model, exactly as Hugging Face PEFT writes them into
its config, so that a saved adapter loads in PEFT. ``folded=True`` marks the kept form: the module
holds only the tensors a saved adapter stores (P-tuning's produced prompts, prefix tuning's per-layer
keys/values), nothing is initialised (the values come from the file); adapters read from a file
and adapters after ``tuned.finalize()`` are folded.

The routing (where the virtual tokens go, masks, positions, labels, the KV cache, generation) is
:class:`subpeft.core.prompt.PromptAdapter`'s; see its module docstring for the definition.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.errors import ConfigError
from ..core.prompt import PromptAdapter
from ..core.weights import weight_access

# PEFT task types by the ending of the transformers class name
_TASKS = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("Model", "FEATURE_EXTRACTION"),
)
# head names PEFT adds to modules_to_save for every classifier model, whichever the model has ("pre_classifier",
# DistilBERT's, since peft 0.22)
_PEFT_HEADS = ("classifier", "score", "pre_classifier")
# PEFT config fields that are bookkeeping (they do not change what a saved adapter computes)
PEFT_BOOKKEEPING = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
    "num_layers", "modules_to_save",
})


def task_type(model: nn.Module) -> str | None:
    """PEFT's task type for a transformers model (decides how PEFT routes the prompts)."""
    name = type(model).__name__
    return next((task for end, task in _TASKS if name.endswith(end)), None)


@dataclass(kw_only=True)
class VirtualTokens(AdapterConfig):
    """Fields of every prompt-kind method.

    num_virtual_tokens: p, the number of virtual tokens (input prompts) or prefix slots.
    folded: the adapter holds only its kept (saved) form and is not initialised (see the module doc).
    token_dim, num_layers, num_attention_heads, task_type: filled from the model at attach.
    """

    peft_type: ClassVar[str | None] = None

    num_virtual_tokens: int = 20
    folded: bool = False
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    task_type: str | None = None

    def validate(self) -> None:
        self._check_positive_int("num_virtual_tokens")
        if self.targets is not None or self.exclude is not None:
            raise ConfigError(
                f"{type(self).__name__} acts on the model's input and attention, not on chosen modules: leave "
                f"targets and exclude unset (got targets={self.targets!r}, exclude={self.exclude!r})"
            )
        for name in ("token_dim", "num_layers", "num_attention_heads"):
            if getattr(self, name) is not None:
                self._check_positive_int(name)

    # -- Hugging Face PEFT's prompt-learning configs ------------------------------------------------
    def _peft_common(self) -> dict[str, Any] | None:
        if self.token_dim is None or self.num_layers is None:
            return None  # not attached yet: nothing PEFT could build from
        return {
            "peft_type": self.peft_type,
            "task_type": self.task_type,
            "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": self.token_dim,
            "num_transformer_submodules": 1,
            "num_attention_heads": self.num_attention_heads,
            "num_layers": self.num_layers,
            "inference_mode": True,
            "modules_to_save": self.modules_to_save,
            "revision": None,
        }

    @classmethod
    def _peft_fields(cls, data: dict[str, Any], known: set[str]) -> dict[str, Any]:
        """The common subpeft fields of a PEFT prompt-learning dict (a saved adapter: folded)."""
        if int(data.get("num_transformer_submodules") or 1) != 1:
            raise ConfigError(
                f"this PEFT {data.get('peft_type')} adapter is for an encoder-decoder model "
                "(num_transformer_submodules=2); subpeft's prompt methods support encoders and decoders"
            )
        unknown = sorted(k for k, v in data.items() if k not in PEFT_BOOKKEEPING and k not in known and v)
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring PEFT config options subpeft does not know: {unknown}",
                          UserWarning, stacklevel=3)
        return dict(
            num_virtual_tokens=int(data.get("num_virtual_tokens", 20)),
            folded=True,
            token_dim=data.get("token_dim"),
            num_layers=data.get("num_layers"),
            num_attention_heads=data.get("num_attention_heads"),
            task_type=data.get("task_type"),
            modules_to_save=_dedupe(data.get("modules_to_save")),
        )


def _dedupe(names: list[str] | None) -> list[str] | None:
    return list(dict.fromkeys(names)) if names else None


def embedding_factory(model: nn.Module) -> dict[str, Any]:
    """Device and dtype for a prompt's trainable tensors: the model's device, at least float32."""
    weight = weight_access(model.get_input_embeddings())
    dtype = torch.promote_types(weight.dtype, torch.float32) if weight.dtype.is_floating_point else torch.float32
    return {"device": weight.device, "dtype": dtype}


class VirtualAdapter(PromptAdapter):
    """A prompt-kind adapter sized by the model's dimensions (filled into its config at attach)."""

    uses_kv: ClassVar[bool] = False  # sized by the attention's key/value width (prefixes) or d_model (prompts)

    @classmethod
    def model_dims(cls, model: nn.Module) -> dict[str, int]:
        config = getattr(model, "config", None)
        if config is None or not hasattr(model, "get_input_embeddings"):
            raise ConfigError(
                f"{cls.config_cls.__name__} needs a Hugging Face transformers model (with .config and "
                f"get_input_embeddings()); got {type(model).__name__}"
            )
        if getattr(config, "is_encoder_decoder", False):
            raise ConfigError(
                f"{cls.config_cls.__name__} supports encoder-only and decoder-only transformers; "
                f"{type(model).__name__} is an encoder-decoder model"
            )
        if cls.uses_kv:
            from ..core.arch import describe

            parts = describe(model, method=cls.config_cls.method)
            return {"token_dim": parts.num_kv_heads * parts.head_dim, "num_layers": parts.num_layers,
                    "num_attention_heads": parts.num_kv_heads}
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return {"token_dim": int(model.get_input_embeddings().embedding_dim),
                "num_layers": int(getattr(text, "num_hidden_layers", 0) or 0) or 1,
                "num_attention_heads": int(getattr(text, "num_attention_heads", 0) or 0) or 1}

    @classmethod
    def prepare_config(cls, config: VirtualTokens, model: nn.Module) -> VirtualTokens:
        dims = cls.model_dims(model)
        for name, value in dims.items():
            given = getattr(config, name)
            if given is not None and given != value:
                raise ConfigError(
                    f"this {config.method} adapter was made for {name}={given}, but {type(model).__name__} has "
                    f"{name}={value}: was it trained on a different base model?"
                )
        saved = config.modules_to_save
        if saved:  # PEFT's classifier models list "classifier", "score" (and "pre_classifier"): keep what the model has
            leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
            saved = [n for n in saved if n not in _PEFT_HEADS or n in leaves] or None
        return config.replace(**dims, task_type=config.task_type or task_type(model), modules_to_save=saved)

    @classmethod
    def shared_file_key(cls, config: AdapterConfig, key: str) -> str:
        return key  # PEFT's prompt-learning files hold the one tensor "prompt_embeddings" at the top level


class InputPromptAdapter(VirtualAdapter):
    """Prompt tuning and P-tuning: p vectors in the input-embedding space, put before the real tokens.

    Subclasses give :meth:`prompts` (``(p, d_model)``); the kept form is that table, saved as PEFT's
    ``prompt_embeddings``.
    """

    def prompts(self) -> torch.Tensor:
        raise NotImplementedError

    def virtual_embeddings(self, batch_size: int) -> torch.Tensor:
        table = self.prompts()
        return table.unsqueeze(0).expand(batch_size, *table.shape)

    def file_state(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prompts() if not self.config.folded else self.prompt_embeddings}
