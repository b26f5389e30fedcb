from clframe.metrics.matrix import (
    average_accuracy,
    average_forgetting,
    average_incremental_accuracy,
    backward_transfer,
    learning_accuracy,
    summarize_matrix,
)

__all__ = [
    "average_accuracy",
    "average_forgetting",
    "average_incremental_accuracy",
    "backward_transfer",
    "learning_accuracy",
    "summarize_matrix",
]
