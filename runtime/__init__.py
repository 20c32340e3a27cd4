"""Lingli (伶荔): a kernel-level inference runtime for LLaMA-family models.

    from runtime import LLM, SamplingParams
    llm = LLM("smollm2")
    print(llm.generate(["The capital of France is"])[0].text)

Submodules are imported lazily so that `import runtime.config` (or the
converter) does not pull in the C++ extension or the whole stack.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "LingliError"]

if TYPE_CHECKING:  # pragma: no cover
    from .errors import LingliError
    from .llm import LLM, RequestOutput
    from .sampler import SamplingParams


def __getattr__(name: str) -> Any:
    if name in ("LLM", "RequestOutput"):
        from . import llm
        return getattr(llm, name)
    if name == "SamplingParams":
        from .sampler import SamplingParams
        return SamplingParams
    if name == "LingliError":
        from .errors import LingliError
        return LingliError
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
