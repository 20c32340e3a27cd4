"""ARM NEON quantized kernels (csrc/qlinear_neon.cpp) and the aarch64 attention path
(csrc/attention.cpp: plain kernels, half caches widened by __fp16), cross-built and run
under qemu-user.

csrc/tests/qlinear_test.cpp is built for aarch64 with plain -march=armv8-a (the
sdot kernel carries its own target attribute) and run on two emulated CPUs:

* ``-cpu max``: has dotprod, so qgemm_neon and qgemm_neon_dot are both checked
  against qgemm_plain, and the dispatcher picks "neon_dot";
* ``-cpu cortex-a53``: Armv8.0 without dotprod, so only qgemm_neon runs and the
  dispatcher must pick "neon". Executing an SDOT there kills the process with
  SIGILL, so a clean exit also shows the sdot code is never reached.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CROSS = shutil.which("aarch64-linux-gnu-g++")
QEMU = shutil.which("qemu-aarch64")

pytestmark = pytest.mark.skipif(CROSS is None or QEMU is None,
                                reason="needs aarch64-linux-gnu-g++ and qemu-aarch64")

SOURCES = ["tests/qlinear_test.cpp", "qlinear.cpp", "qlinear_neon.cpp", "cpu_features.cpp"]
ATTN_SOURCES = ["tests/attention_test.cpp", "attention.cpp", "rope.cpp", "cpu_features.cpp"]  # rope_write uses rope_head
SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed$")


def _links_openmp_statically(tmp: Path) -> bool:
    src = tmp / "omp.cpp"
    src.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
    r = subprocess.run([CROSS, "-fopenmp", "-static", str(src), "-o", str(tmp / "omp")],
                       capture_output=True, text=True)
    return r.returncode == 0


def _build(tmp: Path, name: str, sources: list[str]) -> Path:
    exe = tmp / name
    omp = ["-fopenmp"] if _links_openmp_statically(tmp) else []
    cmd = [CROSS, "-std=c++17", "-O2", "-march=armv8-a", "-static", "-Wall", *omp, f"-I{CSRC}",
           *(str(CSRC / s) for s in sources), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, " ".join(cmd) + "\n" + r.stderr
    return exe


@pytest.fixture(scope="module")
def qtest_exe(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("neon_qemu"), "qlinear_test", SOURCES)


def _run(exe: Path, cpu: str) -> tuple[str, int, int]:
    r = subprocess.run([QEMU, "-cpu", cpu, str(exe)], capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"qemu -cpu {cpu}: exit {r.returncode}\n{out[-4000:]}"
    lines = r.stdout.strip().splitlines()
    m = SUMMARY.match(lines[-1]) if lines else None
    assert m, f"no summary line:\n{out[-4000:]}"
    return r.stdout, int(m.group(1)), int(m.group(2))


def test_neon_and_sdot_match_plain_on_cpu_max(qtest_exe):
    out, passed, failed = _run(qtest_exe, "max")
    assert "dotprod: yes" in out
    assert "paths: plain neon neon_dot" in out
    assert "dispatcher path: neon_dot" in out
    assert failed == 0 and passed > 1000, out[-4000:]


def test_plain_neon_without_dotprod_on_cortex_a53(qtest_exe):
    out, passed, failed = _run(qtest_exe, "cortex-a53")
    assert "dotprod: no" in out
    assert "paths: plain neon\n" in out
    assert "dispatcher path: neon\n" in out
    assert failed == 0 and passed > 700, out[-4000:]


def test_attention_half_and_float_caches_on_aarch64(tmp_path):
    """Every half widens exactly, writes round to nearest even, and decode and prefill
    attention on float32 and half caches match a double reference, on 1 and 2 threads."""
    out, passed, failed = _run(_build(tmp_path, "attention_test", ATTN_SOURCES), "max")
    assert "isa: neon" in out
    assert failed == 0 and passed == 82, out[-4000:]  # 2 + 2 threads x 2 dtypes x 5 head shapes x 2 BS x 2


def test_sdot_only_in_the_dot_kernel(tmp_path):
    """Built with -march=armv8-a, the object has SDOT in qgemm_neon_dot and nowhere else."""
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump is None:
        pytest.skip("aarch64-linux-gnu-objdump not installed")
    obj = tmp_path / "qn.o"
    r = subprocess.run([CROSS, "-std=c++17", "-O3", "-march=armv8-a", f"-I{CSRC}", "-c",
                        str(CSRC / "qlinear_neon.cpp"), "-o", str(obj)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    dis = subprocess.run([objdump, "-d", str(obj)], capture_output=True, text=True).stdout
    where, fn = {}, None
    for line in dis.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            fn = m.group(1)
        elif "\tsdot\t" in line or "\tudot\t" in line:
            where[fn] = where.get(fn, 0) + 1
    assert where, "no sdot emitted at all"
    assert all("qgemm_neon_dot" in f for f in where), where
