from clframe.callbacks.base import ContinualCallback
from clframe.callbacks.continual_eval import ContinualEvaluation
from clframe.callbacks.plots import plot_accuracy_curves, plot_accuracy_matrix

__all__ = ["ContinualCallback", "ContinualEvaluation", "plot_accuracy_curves", "plot_accuracy_matrix"]
