"""Builtin deploy targets (entry-point group ``mlk.targets``): ``server`` (a BentoML service with adaptive
batching), ``jetson`` (an ONNX model with an on-device TensorRT build script) and ``mobile`` (TFLite and
CoreML with a checksummed manifest)."""
