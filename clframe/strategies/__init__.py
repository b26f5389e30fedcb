"""Strategies: one LightningModule per continual-learning method."""

from clframe.strategies.base import ContinualModule
from clframe.strategies.baselines import EWC, Finetune, Joint, LwF
from clframe.strategies.replay.er import ER

__all__ = ["ER", "EWC", "ContinualModule", "Finetune", "Joint", "LwF"]
