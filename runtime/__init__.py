"""runtime/: engines that execute training and the curvature state of the optimizers.

The first layer of the K-FAC runtime for the torch engine (the optimizer itself is still to come):

- ``capture``: records each layer site's input a and pre-activation gradient g on the user's own
  module (a TorchFunctionMode, no module hooks), only inside ``with Capture(module, plan)``.
- ``patches``: convolution patches in F.unfold order (KFC), ONNX pads, conv1d/2d/3d.
- ``factors``: the mini-batch factors A and G of DESIGN.md (homogeneous coordinate, per-example
  gradient scaling, sequences and shared weights as extra positions, groups), the EMA and its schedule.
- ``inverse``: pi from traces, factored Tikhonov damping, NaN-safe Cholesky inverses, preconditioning.
- ``wbar``: W_bar = [W b] per group from weights/grads and back, for both weight layouts; vec convention.
- ``blocks``: KroneckerBlock, one layer's curvature state, with ``to_dense`` for tests.
"""
