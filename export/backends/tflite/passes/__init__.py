"""The TFLite backend's own graph passes (run on the captured PyTorch graph, before litert-torch).

* ``sqrt_div_to_rsqrt`` (:mod:`.rsqrt`): ``x / sqrt(v)`` as ``x * rsqrt(v)`` in the NNAPI pipeline, after the
  norm decompositions: one float-only op per norm instead of two in a full-integer model, and no int8 DIV whose
  divisor can round to its zero point.

Passes on the quantized flatbuffer itself are in ``export/backends/tflite/qdq_passes.py``.
"""
