"""Fused Triton kernels for tldr-fast, installed as `tldr_fast.kernels`."""
