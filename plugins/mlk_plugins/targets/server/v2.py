"""The Open Inference Protocol (v2, "KServe v2") REST inference messages, JSON and binary.

The binary extension (what tritonclient sends by default): the body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by each binary tensor's raw little-endian bytes,
in the order of the header's ``inputs`` that carry ``parameters.binary_data_size``. Replies in the
same form when the client asks for binary outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mlk_plugins.targets.server.signature import BadRequest, Signature, from_tensor

HEADER_LENGTH = "inference-header-content-length"


@dataclass
class InferRequest:
    """A parsed inference request: the checked batch and how to answer."""

    batch: Any
    id: str | None
    binary_output: bool


def _header(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        text, rest = body, b""
    else:
        try:
            size = int(header_length)
        except ValueError:
            raise BadRequest(f"{HEADER_LENGTH} must be an integer; got {header_length!r}") from None
        if not 0 <= size <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} is {size}, but the body holds {len(body)} bytes")
        text, rest = body[:size], body[size:]
    if not text:
        raise BadRequest("the request body is empty; expected a JSON inference request")
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise BadRequest("the inference request must be a JSON object with 'inputs'")
    return header, rest


def parse_infer(body: bytes, header_length: str | None, signature: Signature) -> InferRequest:
    """Parse and check a v2 ``infer`` request body against ``signature``."""
    header, rest = _header(body, header_length)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    if len(inputs) != 1:
        raise BadRequest(f"the model takes one input tensor ({signature.input_name!r}); got {len(inputs)}")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise BadRequest("each input must be an object with name, shape, datatype and data")
    missing = [k for k in ("name", "shape", "datatype") if k not in tensor]
    if missing:
        raise BadRequest(f"input tensor lacks {', '.join(missing)}")
    if tensor["name"] != signature.input_name:
        raise BadRequest(f"unknown input {tensor['name']!r}; the model's input is {signature.input_name!r}")
    params = tensor.get("parameters") or {}
    raw: bytes | None = None
    if isinstance(params, dict) and "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size != len(rest):
            raise BadRequest(f"binary_data_size is {size!r}, but {len(rest)} bytes follow the JSON header")
        raw = rest
    elif rest:
        raise BadRequest("bytes follow the JSON header, but no input declares binary_data_size")
    elif "data" not in tensor:
        raise BadRequest("input tensor lacks data (or binary_data_size for the binary extension)")
    batch = from_tensor(tensor["shape"], tensor["datatype"], tensor.get("data"), raw, signature)
    return InferRequest(batch, _request_id(header), _wants_binary(header))


def _request_id(header: dict[str, Any]) -> str | None:
    rid = header.get("id")
    return str(rid) if rid is not None else None


def _wants_binary(header: dict[str, Any]) -> bool:
    outputs = header.get("outputs")
    if isinstance(outputs, list) and outputs:
        each = [o.get("parameters") or {} for o in outputs if isinstance(o, dict)]
        return any(isinstance(p, dict) and p.get("binary_data") is True for p in each)
    params = header.get("parameters") or {}
    return isinstance(params, dict) and params.get("binary_data_output") is True


def infer_response(request: InferRequest, logits: Any, model: str, version: str,
                   signature: Signature) -> tuple[bytes, dict[str, str]]:
    """The reply body and headers for ``logits`` (float32, one row per example)."""
    import numpy as np

    out = np.ascontiguousarray(logits, dtype="<f4")
    tensor: dict[str, Any] = {"name": signature.output_name, "datatype": "FP32", "shape": list(out.shape)}
    reply: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": [tensor]}
    if request.id is not None:
        reply["id"] = request.id
    if not request.binary_output:
        tensor["data"] = out.reshape(-1).tolist()
        return json.dumps(reply).encode(), {"content-type": "application/json"}
    raw = out.tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps(reply).encode()
    return head + raw, {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def model_metadata(model: str, versions: list[str], platform: str, signature: Signature) -> dict[str, Any]:
    """``GET /v2/models/{name}``."""
    return {
        "name": model,
        "versions": versions,
        "platform": platform,
        "inputs": [{"name": signature.input_name, "datatype": "FP32", "shape": [-1, *signature.input_shape]}],
        "outputs": [{"name": signature.output_name, "datatype": "FP32", "shape": [-1, signature.num_classes]}],
    }
