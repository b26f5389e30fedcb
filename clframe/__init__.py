"""clframe: continual learning on PyTorch Lightning.

The names below are imported on first use (see :mod:`clframe.lazy`): ``import clframe`` and
``clframe --help`` do not pay for Lightning, torch or timm.
"""

from clframe.lazy import lazy_exports

__version__ = "0.1.0"
__all__ = ["ER", "EWC", "ContinualDataModule", "ContinualModule", "ContinualTrainer", "Finetune", "Joint", "LwF",
           "Task", "TaskStream"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "clframe.data.datamodule": ["ContinualDataModule"],
    "clframe.data.stream": ["Task", "TaskStream"],
    "clframe.strategies": ["ER", "EWC", "ContinualModule", "Finetune", "Joint", "LwF"],
    "clframe.trainer": ["ContinualTrainer"],
})
