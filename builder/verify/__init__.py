"""Verification stage: properties proved on a lowered (Q/DQ) graph, e.g. that no integer GEMM overflows its
accumulator (builder.verify.accumulator)."""
