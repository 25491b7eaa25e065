"""The model's input signature, and the checks every request passes before it reaches the batcher.

One bad example would fail the whole batch it joins, so shape, dtype, finiteness and size are checked
per request, and a failure is a :class:`BadRequest` (a 4xx with a message), never a server error.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

#: Open Inference Protocol datatypes accepted for a float32 model input (converted to float32).
FLOAT_TYPES = {"FP32": "float32", "FP64": "float64", "FP16": "float16"}
#: Integer datatypes accepted as well: pixel values often arrive as integers.
INT_TYPES = {"INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "UINT8": "uint8",
             "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64"}


class BadRequest(Exception):
    """A request the server refuses (HTTP ``status``, 400 unless said otherwise)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Signature:
    """What the model takes and gives.

    Attributes:
        input_name: the model input's name (the v2 tensor name clients use).
        input_shape: one example's shape (no batch axis).
        dtype: the model's input dtype (float32 for every builtin model).
        layout: ``flat``, ``nchw`` or ``nhwc``.
        num_classes: length of the output logits.
        labels: a name per class (for the JSON predict route's answers).
        output_name: the output tensor's name.
        max_examples: the most examples one request may carry.
    """

    input_name: str
    input_shape: list[int]
    dtype: str = "float32"
    layout: str = "flat"
    num_classes: int = 0
    labels: list[str] = field(default_factory=list)
    output_name: str = "logits"
    max_examples: int = 256

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Signature:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    @classmethod
    def from_meta(cls, meta: dict[str, Any], max_examples: int) -> Signature:
        """The signature of an artifact (its ``meta`` facts)."""
        classes = int(meta.get("num_classes") or 0)
        labels = [str(c) for c in meta.get("classes") or range(classes)]
        return cls(input_name=str(meta.get("input_name", "x")), input_shape=[int(d) for d in meta["input_shape"]],
                   dtype=str(meta.get("dtype", "float32")), layout=str(meta.get("layout", "flat")),
                   num_classes=classes, labels=labels, output_name=str(meta.get("output_name", "logits")),
                   max_examples=max_examples)

    @property
    def example_size(self) -> int:
        return math.prod(self.input_shape)

    def check(self, array: Any) -> Any:
        """``array`` as a C-contiguous batch of the model's dtype, or :class:`BadRequest` saying why not.

        A single example (the signature's shape) becomes a batch of one.
        """
        import numpy as np

        x = np.asarray(array)
        if x.dtype == object or x.dtype.kind not in "fiu":
            raise BadRequest(f"inputs must be numbers of dtype {self.dtype}; got {_kind(x)}")
        shape = list(x.shape)
        if shape == self.input_shape:
            x, shape = x[None], [1, *shape]
        if len(shape) != len(self.input_shape) + 1 or shape[1:] != self.input_shape:
            raise BadRequest(f"inputs must have shape [batch, {', '.join(map(str, self.input_shape))}] "
                             f"(or one example of shape {self.input_shape}); got {shape}")
        if shape[0] < 1:
            raise BadRequest("inputs hold no example (batch of 0)")
        if shape[0] > self.max_examples:
            raise BadRequest(f"a request may carry at most {self.max_examples} examples; got {shape[0]}", status=413)
        x = np.ascontiguousarray(x, dtype=self.dtype)
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise BadRequest("inputs hold NaN or infinite values")
        return x


def _kind(x: Any) -> str:
    if x.dtype == object:
        return "a ragged or mixed list"
    return {"b": "booleans", "U": "strings", "S": "bytes", "c": "complex numbers"}.get(x.dtype.kind, str(x.dtype))


def _numbers(data: Any, what: str, dtype: str) -> Any:
    """Nested JSON lists as a numeric array (numpy parses them in C); strings, booleans, nulls and ragged
    lists are refused."""
    import numpy as np

    try:
        array = np.array(data)
    except (ValueError, TypeError) as e:
        raise BadRequest(f"{what} is not a regular array (ragged nested lists): {e}") from None
    if array.dtype == object or array.dtype.kind not in "fiu":
        raise BadRequest(f"{what} must hold numbers of dtype {dtype}; got {_kind(array)}")
    return array


def from_json_list(data: Any, signature: Signature) -> Any:
    """A batch from nested JSON lists (the JSON predict route), checked against ``signature``."""
    if not isinstance(data, list):
        raise BadRequest(f"'inputs' must be a list of examples (nested lists of numbers); got {type(data).__name__}")
    return signature.check(_numbers(data, "'inputs'", signature.dtype))


def from_tensor(shape: Any, datatype: Any, data: Any, raw: bytes | None, signature: Signature) -> Any:
    """A batch from an Open Inference Protocol tensor: ``shape``, ``datatype`` and either JSON ``data``
    (flat or nested) or ``raw`` little-endian bytes (the binary extension)."""
    import numpy as np

    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadRequest(f"'shape' must be a list of non-negative integers; got {shape!r}")
    if not isinstance(datatype, str):
        raise BadRequest(f"'datatype' must be a string such as FP32; got {datatype!r}")
    numpy_type = FLOAT_TYPES.get(datatype) or INT_TYPES.get(datatype)
    if numpy_type is None:
        raise BadRequest(f"datatype {datatype} is not accepted; the model takes FP32 "
                         f"(also {', '.join(sorted(set(FLOAT_TYPES) - {'FP32'}))} or an integer type)")
    count = math.prod(shape)
    if count > signature.example_size * signature.max_examples:
        raise BadRequest(f"a request may carry at most {signature.max_examples} examples", status=413)
    if raw is not None:
        dtype = np.dtype(numpy_type).newbyteorder("<")
        if len(raw) != count * dtype.itemsize:
            raise BadRequest(f"binary data holds {len(raw)} bytes; shape {shape} of {datatype} needs "
                             f"{count * dtype.itemsize}")
        array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    else:
        if not isinstance(data, list):
            raise BadRequest("'data' must be a list of numbers (or use the binary extension)")
        flat = _numbers(data, "'data'", datatype).reshape(-1)
        if flat.size != count:
            raise BadRequest(f"'data' holds {flat.size} values; shape {shape} needs {count}")
        array = flat.reshape(shape)
    return signature.check(array)
