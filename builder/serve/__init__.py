"""Serving stage: export engines into a Triton Inference Server model repository."""
