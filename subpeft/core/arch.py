"""Where the parts of a transformer are: one small description per architecture family.

Module-level adapters (Houlsby, Pfeiffer, AdaMix, UniPELT) and prompts/prefixes act on blocks,
attention and inputs rather than on one weight, so they need to know where a model keeps its blocks,
its attention output projection, its FFN output and its LayerNorms. That knowledge lives here, once,
as module paths; supporting a new architecture is one :func:`register_architecture` call::

    register_architecture(Architecture(
        name="llama", model_types=("llama", "mistral", "qwen2"), blocks="layers",
        attention="self_attn", query="self_attn.q_proj", key="self_attn.k_proj", value="self_attn.v_proj",
        attn_out="self_attn.o_proj", ffn_out="mlp.down_proj",
        norms=("input_layernorm", "post_attention_layernorm"), decoder=True,
    ))

Paths of ``blocks`` are relative to the base transformer (``model.base_model``); every other path is
relative to one block.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]  # values of ``model.config.model_type`` this description fits
    blocks: str  # the ModuleList of transformer blocks, relative to ``model.base_model``
    attention: str  # the attention module of a block
    query: str
    key: str
    value: str
    attn_out: str  # attention output projection (a Linear)
    ffn_out: str  # the FFN's last projection (a Linear)
    norms: tuple[str, ...]  # the block's LayerNorms / RMSNorms
    decoder: bool = False  # causal self-attention (generation with a KV cache)


@dataclass(frozen=True)
class ModelParts:
    """An architecture resolved on one model: full module names (as ``model.named_modules()`` gives)."""

    arch: Architecture
    blocks: tuple[str, ...]  # full name of every block, in order
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def per_block(self, field: str) -> list[str]:
        """Full names of one part (a field of :class:`Architecture`, e.g. ``"attn_out"``) in every block."""
        rel = getattr(self.arch, field)
        paths = rel if isinstance(rel, tuple) else (rel,)
        return [f"{b}.{p}" for b in self.blocks for p in paths]


_ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    for t in arch.model_types:
        _ARCHITECTURES[t] = arch
    return arch


register_architecture(Architecture(
    name="bert", model_types=("bert", "roberta", "xlm-roberta", "camembert", "electra"),
    blocks="encoder.layer", attention="attention.self",
    query="attention.self.query", key="attention.self.key", value="attention.self.value",
    attn_out="attention.output.dense", ffn_out="output.dense",
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
))
register_architecture(Architecture(
    name="llama", model_types=("llama", "mistral", "qwen2", "qwen3"),
    blocks="layers", attention="self_attn",
    query="self_attn.q_proj", key="self_attn.k_proj", value="self_attn.v_proj",
    attn_out="self_attn.o_proj", ffn_out="mlp.down_proj",
    norms=("input_layernorm", "post_attention_layernorm"), decoder=True,
))


def supported_model_types() -> list[str]:
    return sorted(_ARCHITECTURES)


def _base_prefix(model: nn.Module) -> tuple[nn.Module, str]:
    """The base transformer inside a task model (``BertForSequenceClassification.bert``) and its name."""
    base = getattr(model, "base_model", model)
    if base is model:
        return model, ""
    for name, module in model.named_modules():
        if module is base:
            return base, name
    return model, ""


def describe(model: nn.Module, method: str = "this method") -> ModelParts:
    """The :class:`ModelParts` of a Hugging Face transformer, or a clear error naming what is missing."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ConfigError(
            f"{method} needs a Hugging Face transformer (a model with .config.model_type) to find its blocks; "
            f"got {type(model).__name__}. Supported model types: {', '.join(supported_model_types())}"
        )
    arch = _ARCHITECTURES.get(model_type)
    if arch is None:
        raise ConfigError(
            f"{method} does not know the architecture {model_type!r} ({type(model).__name__}): subpeft needs to "
            f"know where its blocks, attention and FFN are. Supported: {', '.join(supported_model_types())}. "
            "Add one with subpeft.core.arch.register_architecture(Architecture(...))"
        )
    base, prefix = _base_prefix(model)
    try:
        blocks = base.get_submodule(arch.blocks)
    except AttributeError:
        raise ConfigError(
            f"{type(model).__name__} ({model_type}) has no module {arch.blocks!r} under its base model, where the "
            f"{arch.name} description expects the transformer blocks"
        ) from None
    pre = f"{prefix}.{arch.blocks}" if prefix else arch.blocks
    names = tuple(f"{pre}.{i}" for i in range(len(blocks)))
    for f in fields(Architecture):
        if f.name in ("name", "model_types", "blocks", "decoder"):
            continue
        rel = getattr(arch, f.name)
        for path in rel if isinstance(rel, tuple) else (rel,):
            try:
                blocks[0].get_submodule(path)
            except AttributeError:
                raise ConfigError(
                    f"{type(model).__name__} ({model_type}): block 0 ({names[0]}) has no module {path!r} "
                    f"(the {f.name!r} of the {arch.name} description)"
                ) from None
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    return ModelParts(arch=arch, blocks=names, num_layers=len(names), hidden_size=hidden, num_heads=heads,
                      num_kv_heads=kv, head_dim=head_dim)
