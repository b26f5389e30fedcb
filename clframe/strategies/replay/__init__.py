from clframe.lazy import lazy_exports

__all__ = ["DER", "ER", "DERpp", "GeRe", "ICaRL", "ReplayBuffer", "ReplayModule"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "clframe.strategies.replay.buffer": ["ReplayBuffer"],
    "clframe.strategies.replay.der": ["DER", "DERpp"],
    "clframe.strategies.replay.er": ["ER", "ReplayModule"],
    "clframe.strategies.replay.gere": ["GeRe"],
    "clframe.strategies.replay.icarl": ["ICaRL"],
})
