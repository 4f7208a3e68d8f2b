"""The names ``subpeft.train`` has always offered, kept importable: the package was split in two.

* :mod:`subpeft.training`: the library's training support: the training hooks called in one place
  (:mod:`~subpeft.training.hooks`), the one training loop that calls them (:mod:`~subpeft.training.loop`:
  :class:`Trainer`, :func:`train_classifier`), batching and evaluation (:mod:`~subpeft.training.batches`),
  the Hugging Face ``Trainer`` integration (:mod:`~subpeft.training.hf`, public as :mod:`subpeft.integrations`).
* :mod:`subpeft.app`: the experiment application: tasks and data, models by name, workloads, run specs and
  runs (``subpeft train`` / ``eval``), ``subpeft compare``.

    from subpeft.train import load_tweets, load_minilm_classifier, train_classifier

The old submodules are the new ones under their old names (``subpeft.train.run`` *is*
``subpeft.app.run``, ``subpeft.train.trainer`` and ``subpeft.train.loop`` are ``subpeft.training.loop``), so
that imports and patches of them keep working.
"""

import sys as _sys

from ..app import compare, data, models, run, workloads
from ..app.data import (
    TASKS,
    DataFileError,
    MissingPackageError,
    PairSplit,
    PairTask,
    Split,
    Task,
    load_chat,
    load_data_file,
    load_reviews,
    load_task,
    load_tweets,
)
from ..app.models import MINILM_LINEAR_NAMES, load_folder, load_minilm_classifier, load_smollm2, minilm_path
from ..app.run import BASELINES, DEFAULT_LR, RunSpec, eval_run, train_run
from ..app.workloads import Classification, Generation, make_workload
from ..training import ResumeError, TrainArgs, Trainer, TrainingInterrupted, files
from ..training import loop as trainer
from ..training.batches import evaluate_accuracy, iter_batches, predict_logits
from ..training.loop import TrainResult, TrainState, train_classifier

loop = trainer
for _name, _module in {"compare": compare, "data": data, "models": models, "run": run, "workloads": workloads,
                       "files": files, "trainer": trainer, "loop": loop}.items():
    _sys.modules[f"{__name__}.{_name}"] = _module

__all__ = [
    "BASELINES",
    "Classification",
    "DEFAULT_LR",
    "DataFileError",
    "Generation",
    "MINILM_LINEAR_NAMES",
    "MissingPackageError",
    "PairSplit",
    "PairTask",
    "ResumeError",
    "RunSpec",
    "Split",
    "TASKS",
    "Task",
    "TrainArgs",
    "TrainResult",
    "TrainState",
    "Trainer",
    "TrainingInterrupted",
    "eval_run",
    "evaluate_accuracy",
    "iter_batches",
    "load_chat",
    "load_data_file",
    "load_folder",
    "load_minilm_classifier",
    "load_smollm2",
    "load_reviews",
    "load_task",
    "load_tweets",
    "make_workload",
    "minilm_path",
    "predict_logits",
    "train_classifier",
    "train_run",
]
