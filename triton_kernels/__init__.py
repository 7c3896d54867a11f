"""triton_kernels/: Triton kernels for factor statistics, inversion and preconditioned updates.

None is written yet; each will come with the torch reference it is tested against.
"""
