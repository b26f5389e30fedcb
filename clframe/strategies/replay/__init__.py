from clframe.strategies.replay.buffer import ReplayBuffer
from clframe.strategies.replay.der import DER, DERpp
from clframe.strategies.replay.er import ER, ReplayModule
from clframe.strategies.replay.gere import GeRe
from clframe.strategies.replay.icarl import ICaRL

__all__ = ["DER", "ER", "DERpp", "GeRe", "ICaRL", "ReplayBuffer", "ReplayModule"]
