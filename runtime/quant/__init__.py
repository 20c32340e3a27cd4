"""Weight-only quantized formats (int8 / int4 / int3), quantizers and checkpoints."""
from .formats import GROUP_SIZES, QuantizedTensor, bits_per_weight, quantize_rtn

__all__ = ["GROUP_SIZES", "QuantizedTensor", "bits_per_weight", "quantize_rtn"]
