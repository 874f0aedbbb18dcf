"""Training a MambaLM on a corpus (`mambakit train`, `mambakit prepare`): the settings
(train_config.py), the loop (trainer.py), the learning-rate schedule and weight-decay groups
shared with the task trainers (optim.py), the run's checkpoints (checkpoints.py) and metrics
(metrics.py), stopping on a signal (signals.py), the corpus and its batches (data.py), several
processes under torchrun (distributed.py), and tokenizing a corpus into a token file
(prepare.py)."""

from .checkpoints import latest_checkpoint
from .data import Corpus, batch_at, load_corpus
from .optim import lr_at, param_groups
from .prepare import prepare
from .train_config import TrainConfig
from .trainer import evaluate, train

__all__ = ["Corpus", "TrainConfig", "batch_at", "evaluate", "latest_checkpoint", "load_corpus", "lr_at",
           "param_groups", "prepare", "train"]
