"""triton_kernels/: Triton kernels for the curvature work, each beside a torch reference of the same signature.

- ``statistics``: C <- beta C + alpha X~^T X~ (the homogeneous 1 appended virtually, one triangle computed);
- ``conv_statistics``: a convolution's KFC A factor straight from its input feature map (implicit patches);
- ``inverse``: batched damped inverses of SPD factors by Newton-Schulz, warm-started, with a Cholesky fallback;
- ``dispatch``: the one rule that picks Triton (CUDA tensors) or the reference (elsewhere).

CI proves them against independent computations in Triton's CPU interpreter (TRITON_INTERPRET=1). They have not
run compiled on a GPU yet, and the runtime does not call them yet (issue 15).
"""
