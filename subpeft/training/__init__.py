"""The library's training support, apart from the experiment application (:mod:`subpeft.app`).

* :mod:`~subpeft.training.hooks`: ``regularization()`` / ``step(global_step)`` / ``finalize()``, called in
  one place (:class:`TrainingHooks`).
* :mod:`~subpeft.training.loop`: the one training loop that calls them (:class:`Trainer`: accumulation,
  clipping, eval every N steps, checkpoints that resume bit for bit, Ctrl-C), its settings
  (:class:`TrainArgs`, declared and validated once) and :func:`train_classifier` (labelled texts).
* :mod:`~subpeft.training.batches`: tokenised batches, ``predict_logits``, ``evaluate_accuracy``.
* :mod:`~subpeft.training.files`: files written atomically.
* :mod:`~subpeft.training.hf`: the Hugging Face ``Trainer`` integration (public as :mod:`subpeft.integrations`;
  imported on demand, it needs transformers).
"""

from .batches import evaluate_accuracy, iter_batches, predict_logits
from .hooks import TrainingHooks, find_tuned
from .loop import (
    ResumeError,
    TrainArgs,
    Trainer,
    TrainingInterrupted,
    TrainResult,
    TrainState,
    Workload,
    train_classifier,
)

__all__ = [
    "ResumeError",
    "TrainArgs",
    "TrainResult",
    "TrainState",
    "Trainer",
    "TrainingHooks",
    "TrainingInterrupted",
    "Workload",
    "evaluate_accuracy",
    "find_tuned",
    "iter_batches",
    "predict_logits",
    "train_classifier",
]
