"""Triton GPU kernels for the `triton` backend (runtime/backend_triton.py).

One kernel family per file, each with its plain torch reference beside it
(``<name>_ref``), its test in tests/test_kernels_<file>.py and its benchmark
in bench/bench_triton_<file>.py:

    quant_gemm.py   weight-only GEMM for int8 / int4 / int3 (split-K for decode
                    shapes, tiled for prefill) and the offline repacking of
                    Lingli's portable format into the layout it reads
    attention.py    paged attention over block tables (decode and causal
                    prefill, GQA) and the KV cache write
    norm.py         fused RMSNorm
    rope.py         rotary embedding, interleaved and half-split layouts
    activation.py   SiLU gate: silu(gate) * up

torch and triton are imported only by these modules, never by the CPU path.
Without CUDA the kernels run in Triton's interpreter when TRITON_INTERPRET=1
is set before triton is imported (the tests do this).
"""
