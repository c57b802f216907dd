"""The Core ML backend's own passes: the Apple Neural Engine layout, token tensors in (B, C, 1, S).

Apple's ml-ane-transformers principles: the ANE's native layout is channels-first 4-D, so a sequence
of S tokens with C channels is kept as (B, C, 1, S), every ``nn.Linear`` becomes a 1x1
``Conv2d``, LayerNorm normalises over dim 1 of that tensor and multi-head attention runs
one head at a time with the softmax on dim 1. Apple does this by rewriting the model by
hand (reference model and ANE model side by side, checked by a numerical equivalence test); here it
is four graph passes that apply to any captured model, one module each, run in this order (``ORDER``
in ``export/passes/__init__.py``, after every generic rewrite so that they see the final op set):

* ``ane_channel_layer_norm`` (:mod:`.ane_channel_layer_norm`): LayerNorm over the last dim of
  (B, S, C) as a channel-axis norm of (B, C, 1, S) in primitives (``out * weight + bias`` order);
* ``ane_linear_to_conv`` (:mod:`.ane_linear_to_conv`): every ``linear`` on (B, S, C) / (B, C) wrapped
  in layout changes around a ``conv2d`` with the weight as a constant (O, C, 1, 1) kernel;
* ``ane_split_heads`` (:mod:`.ane_split_heads`): batched attention as per-head einsums, softmax on dim 1;
* ``ane_cancel_transposes`` (:mod:`.ane_cancel_transposes`): moves whole regions of element-wise ops
  (residual adds, GELU, ...) into (B, C, 1, S) and cancels every chain of layout ops that composes to
  nothing (or shortens it), so an MLP fc1 -> gelu -> fc2 and the residual stream stay in (B, C, 1, S)
  throughout; each head's q/k/v chunk is then read straight out of the (B, 3C, 1, S) conv output (a
  channel ``slice``; k one ``transpose(1, 3)``) and the concatenated heads go straight into the
  output conv.

Shared helpers: :mod:`._layout` (the (B, S, C) <-> (B, C, 1, S) layout change, which ops can run in
either layout, dropping replaced constants) and :mod:`._chains` (the canonicaliser that replaces a
chain of data-movement ops by its shortest equivalent form).

Prediction of a Core ML model cannot run on Linux: the tests only show the converted MIL program
has ``conv`` on rank-4 (B, C, 1, S) tensors instead of ``linear`` on rank-3 ones, and per-head
einsums with the softmax on axis 1 of rank-4 maps. The latency benefit is Apple's published claim
(machinelearning.apple.com/research/neural-engine-transformers), not measured here.
"""
