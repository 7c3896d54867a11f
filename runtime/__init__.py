"""runtime/: the torch engine's K-FAC: capture, curvature state and the optimizers.

- ``capture``: records each layer site's input a and pre-activation gradient g on the user's own
  module (a TorchFunctionMode, no module hooks), only inside ``with Capture(module, plan)``.
- ``patches``: convolution patches in F.unfold order (KFC), ONNX pads, conv1d/2d/3d.
- ``factors``: the mini-batch factors A and G of DESIGN.md (homogeneous coordinate, per-example
  gradient scaling, sequences and shared weights as extra positions, groups), symmetric Gram products,
  the rows of the low-rank product of sec 8, the EMA and its schedule.
- ``statistics``: the tau_1 pass with targets sampled from the model, subsets, the EMA decay, the generator.
- ``losses``: the three losses with their output curvature H and sampled targets.
- ``inverse``: pi from traces, factored Tikhonov damping, NaN-safe Cholesky inverses (block-diagonal past a
  width), preconditioning.
- ``wbar``: W_bar = [W b] per group from weights/grads and back, for both weight layouts; vec convention.
- ``blocks``: KroneckerBlock, one layer's curvature state, with ``to_dense`` for tests.
- ``tridiagonal``: the block-tridiagonal inverse of sec 4.3; ``curvature``: both structures behind one API, and
  which layers are narrow enough to hold a block (``within_reach``).
- ``quadratic``: exact-Fisher products by forward mode and the quadratic model of secs 6.4 and 7 (a step shortened
  where it predicts more fall than h can credibly make, ``shortened``).
- ``damping``: the Levenberg-Marquardt rule for lambda, the gamma candidates, and the largest credible fall of h.
- ``methods``: one module per optimizer (``methods.kfac``: ``kronograph.optim.KFAC``), the settings dataclasses and
  ``METHODS``, the registry the CLI is built from; ``preconditioner``: ``kronograph.optim.KFACPreconditioner``.
- ``distributed``: the preconditioner's mini-batch factors averaged across data-parallel ranks (one all_reduce).
- ``sharded``: FSDP2's row-sharded parameters as the preconditioner meets them (the weight a layer computes with,
  a layer's whole gradient, this rank's rows).
- ``quasi_newton``: BFGS and L-BFGS (compact form) with the thesis's damped pairs (DD, D_P D_LM), for K-BFGS.
- ``input_action``: A s of a layer's mini-batch input factor and its mean input, without forming A (K-BFGS's pair).
- ``huggingface``: ``KFACTrainerCallback``, the preconditioner in Hugging Face's Trainer (imports transformers).
"""
