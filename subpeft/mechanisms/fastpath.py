"""When an adapter may take a fused fast path instead of the generic one.

A fused path (LoRA's and DoRA's one-node autograd functions, SAM-PARSER's plain-layer path) computes
the same numbers as the generic path but skips the base layer's own call; it is only taken when
nothing could observe the difference: no hooks on the base layer (or global ones), no autocast, no
functorch transform (vmap, grad) active.
"""

from __future__ import annotations

import torch
from torch import nn

_UNKNOWN = {"unknown torch: always take the generic path": None}
_GLOBAL_HOOKS = tuple(
    getattr(torch.nn.modules.module, name, _UNKNOWN)
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
)


def has_hooks(module: nn.Module) -> bool:
    """Whether hooks could see the base layer's own output (then the generic path keeps it as is)."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks or any(_GLOBAL_HOOKS)
    )


#: whether a functorch transform (vmap, grad, ...) is active now
functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()
