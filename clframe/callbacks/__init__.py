from clframe.callbacks.base import ContinualCallback

__all__ = ["ContinualCallback"]
