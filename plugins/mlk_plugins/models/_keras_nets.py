"""The Keras 3 networks behind the model plugins; imported only when a model is built for ``keras``.

They are the torch networks of :mod:`mlk_plugins.models._torch_nets` layer for layer, with
torch's default initialisation (weights and biases uniform in +-1/sqrt(fan_in)), so a search space
tuned on one framework means the same on the other. They take the dataset's own layout (``nchw``
images, as every mlk runner does) and move channels last inside, where TensorFlow's CPU kernels
want them. Layers have fixed names, so checkpoints and exports do not depend on how many models a
process built before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from mlk_plugins._tensorflow import import_tensorflow

import_tensorflow()
import keras  # noqa: E402
from keras import layers  # noqa: E402


def _torch_like(fan_in: int) -> dict[str, Any]:
    """Initialisers of a layer with ``fan_in`` inputs per output, as torch's Linear and Conv2d have."""
    bound = 1.0 / math.sqrt(fan_in)
    return {
        "kernel_initializer": keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform"),
        "bias_initializer": keras.initializers.RandomUniform(-bound, bound),
    }


def _input(shape: Sequence[int]) -> Any:
    return keras.Input(shape=tuple(int(d) for d in shape), name="x", dtype="float32")


def mlp(meta: dict[str, Any], hidden: int, dropout: float) -> keras.Model:
    """Flatten - Dense(hidden) - ReLU - Dropout - Dense(classes)."""
    inputs = _input(meta["input_shape"])
    features = math.prod(int(d) for d in meta["input_shape"])
    x = layers.Flatten(name="flatten")(inputs)
    x = layers.Dense(hidden, activation="relu", name="fc1", **_torch_like(features))(x)
    x = layers.Dropout(dropout, name="drop")(x)
    logits = layers.Dense(int(meta["num_classes"]), name="logits", **_torch_like(hidden))(x)
    return keras.Model(inputs, logits, name="digits_mlp")


def _conv(channels: int, in_channels: int, name: str) -> layers.Conv2D:
    return layers.Conv2D(channels, 3, padding="same", activation="relu", name=name,
                         **_torch_like(in_channels * 9))


def cifar_cnn(meta: dict[str, Any], dropout1: float, dropout2: float, dropout3: float) -> keras.Model:
    """conv32-conv32-pool-dropout, conv64-conv64-pool-dropout, dense512-dropout, dense classes."""
    channels, height, width = (int(d) for d in meta["input_shape"])
    inputs = _input(meta["input_shape"])
    x = layers.Permute((2, 3, 1), name="to_nhwc")(inputs)
    x = _conv(32, channels, "conv1a")(x)
    x = _conv(32, 32, "conv1b")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Dropout(dropout1, name="drop1")(x)
    x = _conv(64, 32, "conv2a")(x)
    x = _conv(64, 64, "conv2b")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Dropout(dropout2, name="drop2")(x)
    x = layers.Flatten(name="flatten")(x)
    flat = 64 * (height // 4) * (width // 4)
    x = layers.Dense(512, activation="relu", name="fc1", **_torch_like(flat))(x)
    x = layers.Dropout(dropout3, name="drop3")(x)
    logits = layers.Dense(int(meta["num_classes"]), name="logits", **_torch_like(512))(x)
    return keras.Model(inputs, logits, name="cifar_cnn")
