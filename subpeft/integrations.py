"""The Hugging Face ``Trainer`` integration, under its public name: :mod:`subpeft.training.hf` is the module.

    from subpeft.integrations import SubpeftTrainer, SubpeftCallback
"""

import sys as _sys

from .training import hf as _hf
from .training.hf import SubpeftCallback, SubpeftTrainer, find_tuned

_sys.modules[__name__] = _hf  # one module object: patching subpeft.integrations patches the integration

__all__ = ["SubpeftCallback", "SubpeftTrainer", "find_tuned"]
