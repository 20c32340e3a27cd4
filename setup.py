"""Build of the Lingli package and its C++ CPU kernels (runtime._C).

No -march/-mavx2 flags: SIMD variants use function-level target attributes
and are chosen at run time, so one binary runs on any x86-64 (and the same
sources build for aarch64 with NEON).
"""

import glob
import os

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import find_packages, setup

ParallelCompile("NPY_NUM_BUILD_JOBS").install()  # compile csrc files in parallel

HERE = os.path.dirname(os.path.abspath(__file__))

ext_modules = [
    Pybind11Extension(
        "runtime._C",
        sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp"))),
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
]

setup(
    name="lingli",
    version="0.1.0",
    description="Lingli: a small LLM inference runtime",
    packages=find_packages(include=["runtime*", "kernels*", "train*"]),
    # Bundled checkpoints (runtime/models/NAME), e.g. the "poet" model train/ makes.
    package_data={"runtime": ["models/*/*"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.10",
    install_requires=["numpy", "sentencepiece", "tokenizers", "jinja2", "gguf", "tqdm"],
    extras_require={
        # torch only for the transformers parity tests; pinned to the CPU build (2.13.0).
        "test": ["pytest", "pytest-benchmark", "transformers", "torch==2.13.0", "triton==3.7.1",
                 "deepspeed==0.19.8", "fastapi", "uvicorn", "openai", "httpx"],
        # backend="triton" (kernels/): torch 2.13's GPU build pins triton 3.7.1.
        "triton": ["torch==2.13.0", "triton==3.7.1"],
        # train/ (install with DS_BUILD_OPS=0: DeepSpeed then JIT-builds what it needs).
        "train": ["torch==2.13.0", "transformers", "deepspeed==0.19.8"],
        # `lingli serve` (runtime.server); the rest of the runtime does not need them.
        "serve": ["fastapi", "uvicorn"],
        # bench/ only: plots (bench_streams.py); llama-cpp-python is built by hand (anchors.md §7).
        "bench": ["matplotlib", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["lingli = runtime.cli:main"]},
    zip_safe=False,
)
