from clframe.lazy import lazy_exports

__all__ = ["ContinualCallback", "ContinualEvaluation", "plot_accuracy_curves", "plot_accuracy_matrix"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "clframe.callbacks.base": ["ContinualCallback"],
    "clframe.callbacks.continual_eval": ["ContinualEvaluation"],
    "clframe.callbacks.plots": ["plot_accuracy_curves", "plot_accuracy_matrix"],
})
