"""Shared fixtures for the kernel benchmarks; prints a summary table at the end."""

from __future__ import annotations

import pytest

from runtime import _C

# Thread count of the machine, read before any benchmark changes it.
MACHINE_THREADS = _C.get_num_threads()

_summary: list[str] = []


@pytest.fixture(scope="session")
def read_bw():
    """read_bw(threads) -> read bandwidth in GB/s at that thread count, measured now.

    Measured per benchmark rather than once per session: on a shared VM the
    available bandwidth drifts, so the limit is taken next to each timing.
    """

    def get(threads: int) -> float:
        old = _C.get_num_threads()
        _C.set_num_threads(threads)
        try:
            return _C.read_bandwidth(512 << 20, 10)
        finally:
            _C.set_num_threads(old)

    return get


@pytest.fixture(scope="session")
def vnni_peak():
    """vnni_peak(threads) -> the int8 dot-product rate (GOP/s) of that many
    threads together, measured now (0.0 without AVX-512 VNNI).

    Measured, not a per-core constant: a VM's vCPUs may be SMT siblings that
    share one core's vector pipes, and the host moves them (on the build VM
    two threads got 1.0x-1.7x one thread's rate, hour to hour).
    """
    return lambda threads: _C.vnni_peak(threads)


@pytest.fixture
def report():
    """Append one line to the end-of-run summary (and print it for -s)."""

    def add(line: str) -> None:
        print(line)
        _summary.append(line)

    return add


def pytest_terminal_summary(terminalreporter):
    if _summary:
        terminalreporter.section("lingli kernel bandwidth")
        for line in _summary:
            terminalreporter.write_line(line)
