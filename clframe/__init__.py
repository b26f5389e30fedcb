"""clframe: continual learning on PyTorch Lightning."""

from clframe.data.datamodule import ContinualDataModule
from clframe.data.stream import Task, TaskStream
from clframe.strategies import ER, EWC, ContinualModule, Finetune, Joint, LwF
from clframe.trainer import ContinualTrainer

__version__ = "0.1.0"
__all__ = ["ER", "EWC", "ContinualDataModule", "ContinualModule", "ContinualTrainer", "Finetune", "Joint", "LwF",
           "Task", "TaskStream"]
