"""The Flax (linen) networks behind the model plugins; imported only when a model is built for ``jax``.

They are the torch networks of :mod:`mlk_plugins.models._torch_nets` layer for layer, with
torch's default initialisation (weights and biases uniform in +-1/sqrt(fan_in)). They take the
dataset's own layout (``nchw`` images, as every mlk runner does) and move channels last inside.
Call them as ``module.apply({"params": p}, x, train=..., rngs={"dropout": key})``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


def _torch_like(fan_in: int) -> dict[str, Any]:
    """Initialisers of a layer with ``fan_in`` inputs per output, as torch's Linear and Conv2d have."""
    bound = 1.0 / math.sqrt(fan_in)

    def bias(key: Any, shape: Any, dtype: Any = jnp.float32) -> Any:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return {"kernel_init": nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"), "bias_init": bias}


class MLP(nn.Module):
    """Flatten - Dense(hidden) - ReLU - Dropout - Dense(classes)."""

    hidden: int
    num_classes: int
    dropout: float

    @nn.compact
    def __call__(self, x: Any, train: bool = False) -> Any:
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden, name="fc1", **_torch_like(x.shape[-1]))(x))
        x = nn.Dropout(self.dropout, deterministic=not train, name="drop")(x)
        return nn.Dense(self.num_classes, name="logits", **_torch_like(self.hidden))(x)


class CifarCNN(nn.Module):
    """conv32-conv32-pool-dropout, conv64-conv64-pool-dropout, dense512-dropout, dense classes."""

    num_classes: int
    dropout1: float
    dropout2: float
    dropout3: float

    @nn.compact
    def __call__(self, x: Any, train: bool = False) -> Any:
        x = jnp.transpose(x, (0, 2, 3, 1))  # NCHW in, channels last for the convolutions
        for block, (channels, rate) in enumerate(((32, self.dropout1), (64, self.dropout2)), start=1):
            for part in "ab":
                conv = nn.Conv(channels, (3, 3), padding="SAME", name=f"conv{block}{part}",
                               **_torch_like(x.shape[-1] * 9))
                x = nn.relu(conv(x))
            x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
            x = nn.Dropout(rate, deterministic=not train, name=f"drop{block}")(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(512, name="fc1", **_torch_like(x.shape[-1]))(x))
        x = nn.Dropout(self.dropout3, deterministic=not train, name="drop3")(x)
        return nn.Dense(self.num_classes, name="logits", **_torch_like(512))(x)


def mlp(meta: dict[str, Any], hidden: int, dropout: float) -> MLP:
    return MLP(hidden=int(hidden), num_classes=int(meta["num_classes"]), dropout=float(dropout))


def cifar_cnn(meta: dict[str, Any], dropout1: float, dropout2: float, dropout3: float) -> CifarCNN:
    return CifarCNN(num_classes=int(meta["num_classes"]), dropout1=float(dropout1), dropout2=float(dropout2),
                    dropout3=float(dropout3))
