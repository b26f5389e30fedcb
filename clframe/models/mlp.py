"""Multi-layer perceptron backbone (the MNIST-family network of the DER / GEM papers)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from clframe.errors import ConfigError

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU}


class MLP(nn.Module):
    """Flatten, then Linear+ReLU layers; ``num_features`` is the width of the last hidden layer.

    ``init="xavier"`` reproduces Mammoth's MNIST MLP (Xavier-uniform weights, zero biases).
    ``activation="leaky_relu"`` (slope 0.01) is the MLP of the InTAct paper.
    """

    def __init__(self, input_size: int, hidden_sizes: Sequence[int] = (100, 100), init: str = "xavier",
                 dropout: float = 0.0, activation: str = "relu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if isinstance(hidden_sizes, (int, str)) or any(isinstance(h, bool) or not isinstance(h, int) or h < 1
                                                        for h in hidden_sizes):
            raise ConfigError(f"MLP hidden_sizes must be a list of positive layer widths (e.g. [100, 100]), got "
                              f"{hidden_sizes!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"MLP dropout must be in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = input_size
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        self.net = nn.Sequential(*layers)
        self.num_features = width
        if init == "xavier":
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
        elif init != "default":
            raise ConfigError(f"init must be 'xavier' or 'default', got {init!r}")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
