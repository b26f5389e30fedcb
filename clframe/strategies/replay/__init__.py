from clframe.strategies.replay.buffer import ReplayBuffer
from clframe.strategies.replay.er import ER, ReplayModule

__all__ = ["ER", "ReplayBuffer", "ReplayModule"]
