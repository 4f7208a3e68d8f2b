"""Training utilities: real tasks and models (offline), training loops, the command line's runs.

    from subpeft.train import load_tweets, load_minilm_classifier, train_classifier

* :mod:`subpeft.train.data`: tasks (``tweets``, ``chat``, the user's CSV/JSONL) as fixed, seeded,
  stratified splits.
* :mod:`subpeft.train.models`: real models from local packages (``minilm``, ``smollm2``) or folders.
* :mod:`subpeft.train.loop`: batching, evaluation and a small training loop that calls the
  library's ``regularization()`` / ``step(global_step)`` hooks.
* :mod:`subpeft.train.workloads`: batches and metrics per kind of task (classification, generation).
* :mod:`subpeft.train.trainer`: the resumable loop of ``subpeft train`` (accumulation, clipping,
  eval every N steps with the best kept, checkpoints that resume bit for bit, Ctrl-C).
* :mod:`subpeft.train.run` / :mod:`subpeft.train.compare`: ``subpeft train`` / ``eval`` / ``compare``.

The Hugging Face ``Trainer`` integration is :mod:`subpeft.integrations`.
"""

from .data import (
    TASKS,
    DataFileError,
    MissingPackageError,
    PairSplit,
    PairTask,
    Split,
    Task,
    load_chat,
    load_data_file,
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
from .models import MINILM_LINEAR_NAMES, load_folder, load_minilm_classifier, load_smollm2, minilm_path
from .run import BASELINES, DEFAULT_LR, RunSpec, eval_run, train_run
from .trainer import ResumeError, TrainArgs, Trainer, TrainingInterrupted, TrainState
from .workloads import Classification, Generation, make_workload

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
    "load_task",
    "load_tweets",
    "make_workload",
    "minilm_path",
    "predict_logits",
    "train_classifier",
    "train_run",
]
