"""Triton kernels of egp_fast, installed as ``egp_fast.kernels``.

Importing this package needs Triton; ``egp_fast.ops`` imports it only when Triton is present.
"""
