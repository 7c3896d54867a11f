"""triton_kernels/: Triton kernels for the curvature work, each beside a torch reference of the same signature.

- ``statistics``: C <- beta C + alpha X~^T X~ (the homogeneous 1 appended virtually, one triangle computed);
- ``conv_statistics``: a convolution's KFC A factor straight from its input feature map (implicit patches);
- ``inverse``: batched damped inverses of SPD factors by Newton-Schulz, warm-started, with a Cholesky fallback;
- ``update``: the step scale G^-1 V A^-1 + momentum + decay, written to the weights in the GEMM's epilogue;
- ``tiles``: the GEMM tile loop the batched GEMM and the fused update share;
- ``dispatch``: the one rule that picks Triton (CUDA tensors) or the reference (elsewhere).

CI proves them against independent computations in Triton's CPU interpreter (TRITON_INTERPRET=1). They have not
run compiled on a GPU yet. Where the dispatch picks Triton the runtime calls ``statistics`` (every factor EMA:
runtime.factors.accumulate_grams), ``conv_statistics`` (a conv1d/conv2d layer's A from its input feature map:
runtime.factors.fold_factors_) and ``inverse`` (every damped inverse, warm-started from the one in use except the
centred A's inner block: runtime.inverse.damped_inverse); ``update`` is not called by it yet (issue 15).
"""
