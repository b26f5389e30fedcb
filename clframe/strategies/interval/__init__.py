"""Interval arithmetic (``ibp``), the hypernetwork and the interval strategies built on them."""

from clframe.strategies.interval.hyperinterval import HNet, HyperInterval, HyperIntervalMetrics
from clframe.strategies.interval.hypernet import HyperNetwork, target_cnn, target_mlp
from clframe.strategies.interval.ibp import Interval, IntervalSequential

__all__ = ["HNet", "HyperInterval", "HyperIntervalMetrics", "HyperNetwork", "Interval", "IntervalSequential",
           "target_cnn", "target_mlp"]
