"""Training: the loop, checkpoints and resume, the metrics log and plot, the end-of-run summary."""

from qlorakit.train.checkpoint import TrainerState, list_checkpoints
from qlorakit.train.loop import TrainResult, evaluate, train
from qlorakit.train.metrics import plot_run, read_metrics
from qlorakit.train.summary import finish_run

__all__ = [
    "TrainResult", "TrainerState", "evaluate", "finish_run", "list_checkpoints", "plot_run", "read_metrics", "train",
]
