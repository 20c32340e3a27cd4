"""Quantize a float checkpoint into a Lingli quantized checkpoint (`lingli quantize`)."""
from __future__ import annotations

import os
from pathlib import Path

from ..config import ModelConfig
from ..errors import ConfigError
from .checkpoint import save_quantized
from .formats import check_encoding, check_format
from .quantize_model import DEFAULT_GROUP_SIZE, quantize_float


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, bits: int,
                        group_size: int = DEFAULT_GROUP_SIZE, method: str | None = None,
                        overwrite: bool = False, calib_tokens: int = 2048,
                        progress: bool = True, encoding: str | None = None) -> Path:
    """Read a float checkpoint, quantize every linear and the embedding, write `dst`."""
    from ..hub import resolve_model

    try:
        check_format(bits, group_size)
        if encoding is not None:
            check_encoding(encoding)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    src = resolve_model(str(src))
    config = ModelConfig.from_dir(src)
    if config.quantization_config is not None:
        raise ConfigError(f"{src} is already quantized ({config.quantization_config}); "
                          "quantize from the float checkpoint")
    qweights, info = quantize_float(src, config, bits, group_size, method,
                                    n_tokens=calib_tokens, progress=progress, encoding=encoding)
    return Path(save_quantized(dst, src, qweights, config, info, overwrite=overwrite))
