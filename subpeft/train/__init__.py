"""Training utilities: real tasks and models (offline), and a small training loop.

    from subpeft.train import load_tweets, load_minilm_classifier, train_classifier

* :mod:`subpeft.train.data`: tasks (``tweets``) as fixed, seeded, stratified splits.
* :mod:`subpeft.train.models`: real models from local packages (``minilm``).
* :mod:`subpeft.train.loop`: batching, evaluation and a training loop that calls the
  library's ``regularization()`` / ``step(global_step)`` hooks.
"""

from .data import (
    TASKS,
    MissingPackageError,
    Split,
    Task,
    load_task,
    load_tweets,
)
from .loop import (
    TrainResult,
    evaluate_accuracy,
    iter_batches,
    predict_logits,
    train_classifier,
)
from .models import MINILM_LINEAR_NAMES, load_minilm_classifier, minilm_path

__all__ = [
    "MINILM_LINEAR_NAMES",
    "TASKS",
    "MissingPackageError",
    "Split",
    "Task",
    "TrainResult",
    "evaluate_accuracy",
    "iter_batches",
    "load_minilm_classifier",
    "load_task",
    "load_tweets",
    "minilm_path",
    "predict_logits",
    "train_classifier",
]
