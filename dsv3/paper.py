"""Constants from the DeepSeek-V3 technical report (arXiv 2412.19437) and its companions.

One place for every published number the code and the tests rely on, each with its source.
Section numbers refer to the V3 report unless another paper is named.
"""

# --- Model (§2, official config_671B.json) --------------------------------------------------------
TOTAL_PARAMS_671B = 671e9  # §1: "671B total parameters"
ACTIVATED_PARAMS_671B = 37e9  # §1: "37B activated for each token"
MTP_PARAMS_671B = 14e9  # README of the release: 685B = 671B main model + 14B MTP module
KV_CACHE_VALUES_PER_TOKEN_671B = 61 * 576  # §2.1.1: kv_lora_rank 512 + rope 64, per layer

# --- Load balancing (§2.1.2, §4.2; Wang et al. 2024, arXiv 2408.15664) -------------------------------
BIAS_UPDATE_SPEED = 0.001  # gamma, for the first 14.3T tokens, then 0 (§4.2)
BALANCE_LOSS_ALPHA = 0.0001  # sequence-wise balance loss weight (§4.2)
MAX_NODES_PER_TOKEN = 4  # node-limited routing, M (§2.1.2, §4.2)

# --- Multi-token prediction (§2.2, §4.2, §5.4.3) -----------------------------------------------------
MTP_LAMBDA_EARLY = 0.3  # first 10T tokens (§4.2)
MTP_LAMBDA_LATE = 0.1  # remaining 4.8T tokens (§4.2)
MTP_SECOND_TOKEN_ACCEPTANCE = (0.85, 0.90)  # §5.4.3
MTP_DECODE_SPEEDUP = 1.8  # §5.4.3, tokens per second

# --- FP8 (§3.3) --------------------------------------------------------------------------------------
E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
FP8_TILE = 128  # 1x128 activation tiles, 128x128 weight blocks (§3.3.2)
FP8_PROMOTION_INTERVAL = 128  # N_C: promote partial sums to FP32 every 128 elements of K (§3.3.2)
FP8_REL_LOSS_ERROR_BOUND = 0.0025  # FP8 vs BF16 relative loss error stays below 0.25% (§3.3, App. B.1)

# --- Training recipe (§4.2) --------------------------------------------------------------------------
ADAMW_BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
PEAK_LR = 2.2e-4
FINAL_LR = 2.2e-5
TAIL_LR = 7.3e-6
WARMUP_STEPS = 2000
INIT_STD = 0.006
FIM_RATE = 0.1  # §4.1
