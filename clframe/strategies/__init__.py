"""Strategies: one LightningModule per continual-learning method."""

from clframe.strategies.base import ContinualModule
from clframe.strategies.baselines import EWC, Finetune, Joint, LwF
from clframe.strategies.prompt import (
    L2P,
    OVOR,
    CODAPrompt,
    DualPrompt,
    LinearProbe,
    NearestClassMean,
    OnePrompt,
)
from clframe.strategies.replay.der import DER, DERpp
from clframe.strategies.replay.er import ER
from clframe.strategies.replay.gere import GeRe
from clframe.strategies.replay.icarl import ICaRL
from clframe.strategies.si import SI
from clframe.strategies.supermask import WSN, ExSSNeT, SupSup

__all__ = ["DER", "ER", "EWC", "GeRe", "DERpp", "ICaRL", "WSN", "ContinualModule", "ExSSNeT", "Finetune", "Joint", "LwF", "SupSup",
           "L2P", "DualPrompt", "CODAPrompt", "OnePrompt", "OVOR", "LinearProbe", "NearestClassMean"]
__all__ += ["SI"]
