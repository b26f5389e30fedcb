"""Strategies: one LightningModule per continual-learning method (imported on first use, see
:mod:`clframe.lazy`)."""

from clframe.lazy import lazy_exports

__all__ = ["DER", "ER", "EWC", "GeRe", "DERpp", "ICaRL", "WSN", "ContinualModule", "ExSSNeT", "Finetune", "Joint", "LwF", "SupSup",
           "L2P", "DualPrompt", "CODAPrompt", "OnePrompt", "OVOR", "LinearProbe", "NearestClassMean"]
__all__ += ["SI"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "clframe.strategies.base": ["ContinualModule"],
    "clframe.strategies.baselines": ["EWC", "Finetune", "Joint", "LwF"],
    "clframe.strategies.prompt": ["L2P", "OVOR", "CODAPrompt", "DualPrompt", "LinearProbe", "NearestClassMean", "OnePrompt"],
    "clframe.strategies.replay.der": ["DER", "DERpp"],
    "clframe.strategies.replay.er": ["ER"],
    "clframe.strategies.replay.gere": ["GeRe"],
    "clframe.strategies.replay.icarl": ["ICaRL"],
    "clframe.strategies.si": ["SI"],
    "clframe.strategies.supermask": ["WSN", "ExSSNeT", "SupSup"],
})
