"""runtime/: engines that execute training and the curvature state of the optimizers.

Nothing trains yet: the K-FAC runtime is the next piece of work (see the issue tracker).
"""
