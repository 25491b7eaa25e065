"""The peer of the serve benchmark: a plain BentoML 1.4 service written the way BentoML's docs show
(a class with ``@bentoml.service``, the model loaded in ``__init__``, one ``@bentoml.api(batchable=True)``
method over numpy arrays), serving the same ONNX Runtime file with the same batching settings.

``PLAIN_MODEL`` is the .onnx file; ``PLAIN_MAX_BATCH_SIZE``, ``PLAIN_MAX_LATENCY_MS`` and
``PLAIN_THREADS`` the settings (read at import, as a service file would hard-code them).
"""

from __future__ import annotations

import os

import bentoml
import numpy as np

MAX_BATCH_SIZE = int(os.environ.get("PLAIN_MAX_BATCH_SIZE", "32"))
MAX_LATENCY_MS = int(os.environ.get("PLAIN_MAX_LATENCY_MS", "200"))


@bentoml.service(name="plain-onnx", workers=1, traffic={"timeout": 60})
class PlainOnnx:
    """ONNX Runtime behind BentoML's adaptive batching."""

    def __init__(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("PLAIN_THREADS", "1"))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(os.environ["PLAIN_MODEL"], options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def predict(self, inputs: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: inputs.astype(np.float32)})[0]
