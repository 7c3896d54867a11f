"""The matchers, tried in order on every node; the first that answers wins."""

from kronograph.passes.match.conv import match_conv, match_conv_transpose
from kronograph.passes.match.embedding import match_gather
from kronograph.passes.match.linear import match_einsum, match_gemm, match_matmul

MATCHERS = (match_gemm, match_matmul, match_einsum, match_conv, match_conv_transpose, match_gather)
