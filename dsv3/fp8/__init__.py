"""Fine-grained FP8 mixed-precision training (DESIGN §4, paper §3.3); see docs/fp8.md.

quant.py    E4M3 1x128 tiles / 128x128 blocks, power-of-2 scales, E5M6, (de)quantisation
gemm.py     block-scaled GEMM with FP32 promotion; limited-accumulator and BF16 GEMM emulations
operand.py  GEMM operands of one precision (FP8 or the BF16 baseline), GemmConfig
linear.py   Fp8Linear: Fprop, Dgrad, Wgrad in FP8, input cached in FP8 (or E5M6)
mlp.py      SwiGLU MLPs and grouped experts: SwiGLU input cached in FP8, output recomputed
policy.py   convert(model, recipe): which GEMMs run in FP8
"""

from dsv3.fp8.gemm import bf16_gemm, fp8_gemm, limited_acc_gemm
from dsv3.fp8.linear import Fp8Linear, linear
from dsv3.fp8.mlp import Fp8GroupedExperts, Fp8MLP, swiglu_experts
from dsv3.fp8.operand import GemmConfig
from dsv3.fp8.policy import convert, fp8_gemm_modules
from dsv3.fp8.quant import (
    dequantize_blocks,
    dequantize_tiles,
    quantize_blocks,
    quantize_tiles,
    round_scale_pow2,
)

__all__ = [
    "Fp8GroupedExperts", "Fp8Linear", "Fp8MLP", "GemmConfig", "bf16_gemm", "convert", "dequantize_blocks",
    "dequantize_tiles", "fp8_gemm", "fp8_gemm_modules", "limited_acc_gemm", "linear", "quantize_blocks",
    "quantize_tiles", "round_scale_pow2", "swiglu_experts",
]  # fmt: skip
