"""Supermask strategies: SupSup, WSN and ExSSNeT, on shared masked layers (``layers.py``)."""

from clframe.strategies.supermask.base import SupermaskModule
from clframe.strategies.supermask.exssnet import ExSSNeT
from clframe.strategies.supermask.supsup import SupSup
from clframe.strategies.supermask.wsn import WSN

SUPERMASK_STRATEGIES = {"supsup": SupSup, "wsn": WSN, "exssnet": ExSSNeT}

__all__ = ["SUPERMASK_STRATEGIES", "WSN", "ExSSNeT", "SupSup", "SupermaskModule"]
