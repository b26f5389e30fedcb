"""Interval arithmetic (``ibp``), the hypernetwork and the interval strategies built on them."""

from clframe.lazy import lazy_exports

__all__ = ["HNet", "HyperInterval", "HyperIntervalMetrics", "HyperNetwork", "Interval", "IntervalSequential",
           "target_cnn", "target_mlp"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "clframe.strategies.interval.hyperinterval": ["HNet", "HyperInterval", "HyperIntervalMetrics"],
    "clframe.strategies.interval.hypernet": ["HyperNetwork", "target_cnn", "target_mlp"],
    "clframe.strategies.interval.ibp": ["Interval", "IntervalSequential"],
})
