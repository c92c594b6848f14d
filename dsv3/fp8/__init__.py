"""Fine-grained FP8 mixed-precision training (DESIGN §4, paper §3.3); see docs/fp8.md.

quant.py  E4M3 1x128 tiles / 128x128 blocks, power-of-2 scales, E5M6, (de)quantisation
"""

from dsv3.fp8.quant import (
    dequantize_blocks,
    dequantize_tiles,
    quantize_blocks,
    quantize_tiles,
    round_scale_pow2,
)

__all__ = ["dequantize_blocks", "dequantize_tiles", "quantize_blocks", "quantize_tiles", "round_scale_pow2"]
