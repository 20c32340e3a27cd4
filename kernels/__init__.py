"""Triton GPU kernels (issue: Triton backend). Empty until that backend lands."""
