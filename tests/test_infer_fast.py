"""The fast decode path (dsv3.infer.decode on the fused weights of dsv3.infer.decode.weights) held to the
model's forward: logits within 1e-5 and identical greedy tokens, the same MoE load counts; it
follows in-place weight changes and steps aside for forward hooks and module swaps."""

import copy

import pytest
import torch
from decode_util import assert_decode_matches_forward, prefill_rows
from torch import nn

from dsv3 import ModelConfig, Transformer
from dsv3.infer.decode import gemm as gemm_lib
from dsv3.infer.decode import kernels as cpu_kernels
from dsv3.infer.decode import step as decode
from dsv3.infer.decode.compiled import DecodeMoE
from dsv3.infer.decode.rows import attention_bytes, row_attention
from dsv3.infer.decode.step import FastDecoder
from dsv3.infer.decode.weights import folds
from dsv3.infer.engine import Engine, EngineConfig
from dsv3.infer.paged_cache import PagedLatentCache, make_context
from dsv3.infer.sampling import SamplingParams
from dsv3.model.moe import MoE

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
VARIANTS = {
    "tiny": {},
    "yarn": dict(max_seq_len=512, original_seq_len=64, rope_factor=4.0),
    "q_proj": dict(q_lora_rank=0),  # no query compression: the query comes from w_in directly
    "softmax_gate": dict(score_func="softmax", n_expert_groups=1, n_limited_groups=1, n_shared_experts=0),
    # DeepSeek-V3's attention geometry on the tiny width: the shape no fold rule was tuned for
    "v3_geometry": dict(
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128
    ),
    # widths off every vector multiple and an odd head count (the attention's head groups and
    # scalar tails: cache rows of 30, latents of 22)
    "odd_widths": dict(n_heads=5, kv_lora_rank=22, qk_rope_head_dim=6),
}


def _model(cfg: ModelConfig) -> Transformer:
    model = Transformer(cfg).eval()
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


def _bf16_valued(model: Transformer) -> Transformer:
    """Every parameter rounded to BF16 and kept in FP32: what loading a BF16 checkpoint gives."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


# one layer of DeepSeek-V3 671B: its attention (dim 7168, 128 heads, q_lora 1536, kv_lora 512, nope
# 128, rope 64, v 128, YaRN) and router settings, with few small experts and a small vocabulary
V3_LAYER = dict(
    n_layers=1, n_dense_layers=0, vocab_size=512, n_routed_experts=32, moe_inter_dim=16, n_mtp_layers=0
)


@pytest.mark.parametrize("weights", ["model", "bf16"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("fold", [None, False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_logits_equal_full_forward(tiny, variant, fold, native, weights):
    """Rows prefilled on the naive path, then decoded by the fast path, in turn batched (gathered
    keys) and one row at a time (with the native kernels the one-call RowDecoder, folded or not;
    else a pool slice when the row's blocks are consecutive). `bf16`: a model with BF16 values
    whose fast path stores the feed-forward matrices and head in BF16: exact, same tolerance."""
    _check_fast_equals_forward(_model(tiny.replace(**VARIANTS[variant])), fold, native, weights)


def test_fast_logits_equal_full_forward_on_one_671b_layer():
    """The real V3 geometry, where neither W_UK nor W_UV folds: the RowDecoder (native kernels)
    applies both per head; the batched rows run the same weights on ATen (the torch and BF16
    variants of this geometry are covered on the tiny width, `v3_geometry`). ~200M parameters."""
    torch.manual_seed(0)
    model = _model(ModelConfig.from_preset("671b").replace(**V3_LAYER))
    assert folds(1536, 7168, 128, 128, 512) == (False, False)
    _check_fast_equals_forward(model, None, True, "model")


def _check_fast_equals_forward(model: Transformer, fold: bool | None, native: bool, weights: str) -> None:
    """5 rows (rows 1 and 3 with non-consecutive blocks), T = 1 batched and alone, T = 3 batched and
    alone, T = 2 alone: logits and final hidden states within 1e-5 of the forward's, relative to
    their largest magnitude (at least 1: absolute for the small presets)."""
    cfg = model.config
    cache = PagedLatentCache(cfg, num_blocks=60, block_size=4)
    dtype = None
    if weights == "bf16":
        model, dtype = _bf16_valued(model), torch.bfloat16
    fast = FastDecoder(model, cache, fold=fold, weight_dtype=dtype, native=native, bf16_gemm=False)  # exact
    assert fast.weights.head.dtype == (dtype or torch.float32)
    assert (fast.kernels.name == "native") == (native and cpu_kernels.why_not_native is None)
    assert (fast._row_decoders()[0] is not None) == (fast.kernels.name == "native")  # any geometry
    lens = [5, 9, 7, 6, 8]
    tables = [cache.allocator.allocate(8) for _ in lens]  # rows 0, 2, 4 consecutive
    for b in (1, 3):  # rows 1 and 3 are not
        tables[b] = [tables[b][i] for i in (1, 0, 2, 4, 3, 5, 6, 7)]
    B = len(lens)
    ids = torch.randint(0, cfg.vocab_size, (B, 24))
    with torch.no_grad():
        h_full = model.hidden_states(ids)
        full = model.lm_head(h_full)  # what model(ids) returns
    prefill_rows(model, cache, ids, lens, tables)

    def check(rows: list[int], p: list[int], T: int) -> None:
        tok = [ids[b, q : q + T].tolist() for b, q in zip(rows, p)]
        x = fast.forward(tok, p, [tables[b] for b in rows])  # (len(rows) * T, D)
        logits, hidden = fast.logits(x).view(len(rows), T, -1), fast.hidden(x).view(len(rows), T, -1)
        for i, (b, q) in enumerate(zip(rows, p)):
            for got, want in ((logits[i], full[b, q : q + T]), (hidden[i], h_full[b, q : q + T])):
                assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())

    for step in range(4):  # T = 1: all rows batched, then each row alone
        pos = [n + step for n in lens]
        if step % 2 == 0:
            check(list(range(B)), pos, 1)
        else:
            for b in range(B):
                check([b], [pos[b]], 1)
    check(list(range(B)), [n + 4 for n in lens], 3)  # T = 3 (verification), causal among them
    for b in (0, 1):  # T = 3 and T = 2 alone: consecutive blocks (row 0) and not (row 1)
        check([b], [lens[b] + 7], 3)
        check([b], [lens[b] + 10], 2)


@pytest.mark.parametrize(
    "native, gemm", [(True, "fp32"), (False, "fp32"), (True, "bf16")], ids=["native", "torch", "bf16-gemm"]
)
def test_fast_logits_equal_full_forward_at_batch_64_on_v3_mini(native, gemm):
    """The v3-mini attention geometry (dim 512, q_lora 1536, kv_lora 512, nope 128, v 128), two
    layers (dense, MoE): 64 rows of different lengths (every other row's blocks out of order) at
    T = 1 and T = 2, through the many-row weights (o_proj not folded with W_UV: it would cost 2x
    the pair's multiply-adds; `AttnWeights.many`), each layer's keys gathered through the tables.
    fp32: within 1e-5; bf16-gemm (where the CPU has BF16 arithmetic): a BF16-valued model, its
    many-row matrices in BF16 GEMMs, within BF16_GEMM_BOUND for every token the MoE layer routes
    to the experts the forward chose: a gate logit moved by BF16 rounding (~3e-3) can flip a
    near-tie in the top-4 routing, and a token routed to another expert differs by more than
    rounding (0-3 of the 128 tokens over seeds 0-3). Those tokens are found by recording both
    paths' routing (the layer's own `Gate.route_logits`), not by a count of misses."""
    plan = cpu_kernels.plan_kernels()
    if gemm == "bf16" and not plan.bf16_gemm:
        pytest.skip(f"no BF16 arithmetic on this CPU ({plan.kind}: {' '.join(plan.flags)})")
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("v3-mini").replace(n_layers=2, vocab_size=512, n_mtp_layers=0)
    model = _model(cfg) if gemm == "fp32" else _bf16_valued(_model(cfg))
    cache = PagedLatentCache(cfg, num_blocks=64 * 4 + 4, block_size=4)
    dtype = torch.bfloat16 if gemm == "bf16" else None
    fast = FastDecoder(model, cache, native=native, weight_dtype=dtype, bf16_gemm=gemm == "bf16")
    few, many = fast.weights.attn[0], fast.weights.attn[0].many
    assert few.w_uv is None and many is not None and many.w_uv is not None
    assert many.w_o.shape == (cfg.n_heads * cfg.v_head_dim, cfg.dim)
    assert (many.w_q is few.w_q) == (gemm == "fp32")  # shared unless stored in BF16
    bound = 1e-5 if gemm == "fp32" else BF16_GEMM_BOUND
    B = 64
    lens = torch.randint(3, 10, (B,)).tolist()
    tables = [cache.allocator.allocate(4) for _ in range(B)]
    tables[1::2] = [t[::-1] for t in tables[1::2]]
    ids = torch.randint(0, cfg.vocab_size, (B, 12))
    gate = model.layers[1].mlp.gate  # the one MoE layer: both paths route through it
    chosen: list[torch.Tensor] = []
    route = gate.route_logits

    def recording(logits):
        out = route(logits)
        chosen.append(out[1].sort(dim=-1).values)  # (rows, k) expert ids
        return out

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(gate, "route_logits", recording)
        full = model(ids)
        routes_full = chosen.pop().view(B, ids.shape[1], -1)
        prefill_rows(model, cache, ids, lens, tables)
        chosen.clear()
        flipped, beyond = 0, []
        for pos, T in (([n for n in lens], 1), ([n + 1 for n in lens], 2)):
            x = fast.forward([ids[b, p : p + T].tolist() for b, p in enumerate(pos)], pos, tables)
            logits, routes = fast.logits(x).view(B, T, -1), chosen.pop().view(B, T, -1)
            for b, p in enumerate(pos):
                for t in range(T):
                    if not torch.equal(routes[b, t], routes_full[b, p + t]):
                        flipped += 1
                        continue
                    want = full[b, p + t]
                    err = ((logits[b, t] - want).abs().max() / max(1.0, want.abs().max().item())).item()
                    if err > bound:
                        beyond.append((b, p + t, err))
    assert not beyond, f"tokens routed as the forward's but beyond {bound:.0e}: {beyond[:5]}"
    assert flipped == 0 if gemm == "fp32" else flipped <= 8  # near-ties only; FP32: the same routing


BF16_GEMM_BOUND = 3e-2  # logits, relative to the largest: activations and outputs rounded to BF16


@pytest.mark.parametrize("variant", ["tiny", "v3_geometry"])
@pytest.mark.parametrize("gemm", ["fp32", "bf16"])
@pytest.mark.parametrize("lib", ["amx", "packed", "aten"])
def test_batched_rows_on_the_kernel_plan(tiny, gemm, variant, lib, caplog, monkeypatch):
    """A BF16-valued model with BF16-stored weights, 6 rows (more than KERNEL_ROWS): FP32 GEMMs are
    exact (1e-5); BF16 GEMMs, which the plan picks where the CPU has AVX512_BF16 or AMX (else this
    variant is skipped), stay within BF16_GEMM_BOUND; on dsv3's AMX kernel (`AmxPacked`, BF16 only:
    skipped where the CPU or the OS has no AMX), on oneDNN-packed weights (skipped where oneDNN
    packing does not run here) and on ATen's GEMMs. The choice is stated in one log line; the
    widened or packed copies are made once and kept for the next step."""
    plan = cpu_kernels.plan_kernels()
    packed, amx = lib != "aten", lib == "amx"
    if gemm == "bf16" and not plan.bf16_gemm:
        pytest.skip(f"no BF16 arithmetic on this CPU ({plan.kind}: {' '.join(plan.flags)})")
    if packed and (why := gemm_lib.why_not_packed(gemm == "bf16")):
        pytest.skip(why)
    if amx and gemm == "fp32":
        pytest.skip("the AMX kernel multiplies BF16 weights only")
    if amx and not getattr(cpu_kernels.kernels(), "amx", False):
        pytest.skip(f"no AMX in this process (CPU flags: {' '.join(plan.flags)})")
    monkeypatch.setenv("DSV3_AMX", "1" if amx else "0")
    tiny = tiny.replace(**VARIANTS[variant])  # v3_geometry: W_UK / W_UV per head (BF16 with BF16 GEMMs)
    model = _bf16_valued(_model(tiny))
    cache = PagedLatentCache(model.config, num_blocks=60, block_size=4)
    with caplog.at_level("INFO", logger="dsv3.infer.decode.step"):
        fast = FastDecoder(
            model,
            cache,
            weight_dtype=torch.bfloat16,
            bf16_gemm=None if gemm == "bf16" else False,
            packed=packed,
        )
    lines = [r.getMessage() for r in caplog.records if r.name == "dsv3.infer.decode.step"]
    assert len(lines) == 1 and lines[0].startswith(f"dsv3 decode kernels: {plan.kind}")
    assert ("packed weights" in lines[0]) == packed and ("AMX tiles" in lines[0]) == amx
    wide = isinstance(fast.kernels, cpu_kernels.Native) and fast.kernels.wide
    assert ("batched attention: native, AVX-512" in lines[0]) == wide and lines[0].endswith(
        "; KV cache: FP32"
    )
    names = {
        "amx": {"bf16": "amx + onednn-packed-bf16"},
        "packed": {"bf16": "onednn-packed-bf16", "fp32": "onednn-packed"},
        "aten": {"bf16": "torch-bf16", "fp32": "torch-widened"},
    }
    if lib == "packed" and gemm == "fp32" and isinstance(fast.kernels, cpu_kernels.Native) and not wide:
        names["packed"]["fp32"] = "avx2-strips + onednn-packed"  # AVX2 without AVX-512F: gemm.Strips
    assert fast._aten.name == names[lib][gemm]
    many = fast.weights.attn[0].many  # the many-row attention matrices: BF16 only with BF16 GEMMs
    assert (many is not None and many.w_q.dtype == torch.bfloat16) == (gemm == "bf16")
    if gemm == "bf16" and variant == "v3_geometry":  # W_UK per head (W_UV folds at this width)
        assert many.w_uk.dtype == torch.bfloat16 and (many.w_uv is None or many.w_uv.dtype == torch.bfloat16)
    lens = [5, 9, 7, 6, 8, 4]
    tables = [cache.allocator.allocate(4) for _ in lens]
    ids = torch.randint(0, tiny.vocab_size, (len(lens), 12))
    with torch.no_grad():
        full = model(ids)
    prefill_rows(model, cache, ids, lens, tables)
    bound = BF16_GEMM_BOUND if gemm == "bf16" else 1e-5
    first: dict = {}
    for step in range(2):
        pos = [n + step for n in lens]
        logits = fast.logits(fast.forward([[int(ids[b, p])] for b, p in enumerate(pos)], pos, tables))
        for b, p in enumerate(pos):
            want = full[b, p]
            assert (logits[b] - want).abs().max() <= bound * max(1.0, want.abs().max().item())
        if amx:  # 6 rows: every many-row matrix packed once into the tiles' layout, kept
            kept = {k: p for k, (w, p) in fast._aten._tiles.items()}
            assert kept and not fast._aten._packed
            assert all(w.dtype == torch.bfloat16 for w, _ in fast._aten._tiles.values())
        elif isinstance(fast._aten, gemm_lib.Strips):  # 6 rows: packed once into 16-column strips, kept
            kept = {k: p for k, (w, p) in fast._aten._strips.items()}
            assert kept and not fast._aten._packed  # BF16-stored weights stay BF16 (int16 bits)
            assert all(
                p.dtype == (torch.int16 if w.dtype == torch.bfloat16 else torch.float32)
                for w, p in fast._aten._strips.values()
            )
        elif packed:  # every many-row matrix packed once (FP32, or BF16 with BF16 GEMMs), kept
            kept = {k: p for k, (w, p, dtype) in fast._aten._packed.items()}
            assert kept and all(
                dtype == (w.dtype if gemm == "bf16" else torch.float32)
                for w, _, dtype in fast._aten._packed.values()
            )
        elif gemm == "fp32":  # FP32 GEMMs on BF16-stored weights: each widened once, kept
            kept = {k: c for k, (w, c) in fast._aten._wide.items()}
            assert kept and all(
                w.dtype == torch.bfloat16 and c.dtype == torch.float32 for w, c in fast._aten._wide.values()
            )
        if packed or gemm == "fp32":
            if step == 1:
                assert kept.keys() == first.keys() and all(kept[k] is first[k] for k in kept)
            first = kept


ROW_MODELS = {  # the presets' geometries, shortened (2 layers: dense then MoE) and a small vocabulary
    "small": dict(n_layers=2, vocab_size=512, n_mtp_layers=0),
    "v3-mini": dict(n_layers=2, vocab_size=512, n_mtp_layers=0),
}


@pytest.mark.parametrize("gemm", ["fp32", "bf16"])
@pytest.mark.parametrize("weights", ["fp32", "bf16"])
@pytest.mark.parametrize("preset", ROW_MODELS)
def test_row_decoder_layouts_on_the_presets(preset, weights, gemm):
    """The one-row decoder streams the attention layout with the fewest bytes (`row_attention`):
    fp32: the few- or many-row folds; bf16: a BF16-valued model's attention unfolded in BF16
    (`AttnWeights.stored`: its norm weights and softmax scale on the activations), whether or not
    BF16 GEMMs run many rows (`bf16_gemm`, forced here: the RowDecoder computes FP32 on any CPU; with
    them the stored copy is the many-row layout too). Every layout exact: logits within 1e-5 of the
    forward. Lone rows at T = 1, 2, 3, one with its blocks out of order."""
    if weights == "fp32" and gemm == "bf16":
        pytest.skip("BF16 GEMMs multiply BF16-stored weights only")
    _check_row_decoder(ModelConfig.from_preset(preset).replace(**ROW_MODELS[preset]), weights, gemm == "bf16")


def test_row_decoder_bf16_attention_on_one_671b_layer():
    """As above on one layer of the 671B geometry (W_UK and W_UV per head), BF16 attention stored."""
    _check_row_decoder(ModelConfig.from_preset("671b").replace(**V3_LAYER), "bf16", False)


def _check_row_decoder(cfg: ModelConfig, weights: str, bf16_gemm: bool) -> None:
    torch.manual_seed(0)
    model = _model(cfg) if weights == "fp32" else _bf16_valued(_model(cfg))
    cache = PagedLatentCache(cfg, num_blocks=24, block_size=4)
    bf16 = weights == "bf16"
    fast = FastDecoder(model, cache, weight_dtype=torch.bfloat16 if bf16 else None, bf16_gemm=bf16_gemm)
    if fast._row_decoders()[0] is None:
        pytest.skip(f"no native RowDecoder here ({cpu_kernels.why_not_native})")
    for a in fast.weights.attn:
        chosen = row_attention(a)
        assert attention_bytes(chosen) <= attention_bytes(a)
        assert (chosen is a.stored) == bf16 and (a.many is a.stored) == bf16_gemm
        assert chosen.w_q.dtype == (torch.bfloat16 if bf16 else torch.float32)
        if bf16:  # nothing folded into the stored matrices: the checkpoint's own values
            assert chosen.q_scale != 1.0 and chosen.norm_w is not None and chosen.w_uk is not None
    tables = [cache.allocator.allocate(8) for _ in range(2)]
    tables[1] = [tables[1][i] for i in (3, 1, 0, 2, 5, 4, 7, 6)]
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    worst = 0.0
    with torch.no_grad():
        full = model(ids)
        for b, table in enumerate(tables):
            pos = torch.arange(5)[None]
            cache.bind(make_context([table], pos, [5], 4))
            model.hidden_states(ids[b : b + 1, :5], pos, cache, absorb=False)
            p = 5
            for T in (1, 2, 3, 1):
                logits = fast.logits(fast.forward([ids[b, p : p + T].tolist()], [p], [table]))
                want = full[b, p : p + T]
                err = ((logits - want).abs().max() / max(1.0, want.abs().max().item())).item()
                worst = max(worst, err)
                p += T
    assert worst <= 1e-5, f"{weights}: logits {worst:.2e} from the forward's (bound 1e-5)"


@pytest.mark.parametrize("variant", ["v3_geometry", "odd_widths"])
@pytest.mark.parametrize("fold", [None, False], ids=["uv_folded", "unfolded"])
def test_row_decoder_does_not_depend_on_the_thread_count(tiny, fold, variant):
    """The native RowDecoder splits columns, heads and W_UK / W_UV across torch's threads: 1 and 2
    threads give bit-identical outputs (T = 1 and T = 3; the V3 attention geometry, and 5 heads
    split 3 + 2)."""
    model = _model(tiny.replace(**VARIANTS[variant]))
    cache = PagedLatentCache(model.config, num_blocks=40, block_size=4)
    fast = FastDecoder(model, cache, fold=fold)
    if fast._row_decoders()[0] is None:
        pytest.skip(f"no native RowDecoder here ({cpu_kernels.why_not_native})")
    table = cache.allocator.allocate(8)
    table = [table[i] for i in (2, 0, 1, 3, 4, 5, 6, 7)]
    ids = torch.randint(0, tiny.vocab_size, (1, 16))
    with torch.no_grad():
        pos = torch.arange(6)[None]
        cache.bind(make_context([table], pos, [6], 4))
        model.hidden_states(ids[:, :6], pos, cache, absorb=False)
    threads = torch.get_num_threads()
    try:
        for p, T in ((6, 1), (7, 3)):
            out = []
            for n in (1, 2):  # the same step again overwrites its cache rows with the same values
                torch.set_num_threads(n)
                out.append(fast.logits(fast.forward([ids[0, p : p + T].tolist()], [p], [table])))
            assert torch.equal(out[0], out[1])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("variant", ["tiny", "q_proj"])
def test_fast_mtp_draft_equals_the_model_mtp_module(tiny, variant, native):
    """`mtp_forward` (MTP module 1 over its cache layer) equals the model's MTP module on the same
    cache: one row on a pool slice, rows batched on gathered keys, and T = 2 tokens per row (one
    row: the native RowDecoder's token-by-token causal order); the
    MTP MoE's `last_counts` are set as the model's forward sets them."""
    model = _model(tiny.replace(**VARIANTS[variant]))
    ref_model = copy.deepcopy(model)
    caches = [PagedLatentCache(model.config, num_blocks=40, block_size=4) for _ in range(2)]
    fast = FastDecoder(model, caches[0], native=native)
    assert fast.can_draft()
    tables = [caches[0].allocator.allocate(8) for _ in range(2)]
    for c in caches[1:]:
        assert [c.allocator.allocate(8) for _ in range(2)] == tables
    ids = torch.randint(0, tiny.vocab_size, (2, 16))
    with torch.no_grad():
        h = ref_model.hidden_states(ids)
        for c in caches:  # both caches: main layers and the MTP layer prefilled on the naive path
            for b in range(2):
                pos = torch.arange(6)[None]
                c.bind(make_context([tables[b]], pos, [6], 4))
                ref_model.hidden_states(ids[b : b + 1, :6], pos, c, absorb=False)
                ref_model.mtp_hidden(1, h[b : b + 1, :6], ids[b : b + 1, 1:7], pos, c, absorb=False)

    def reference(rows: list[int], p: int, T: int) -> torch.Tensor:
        pos = torch.full((len(rows), 1), p) + torch.arange(T)
        caches[1].bind(make_context([tables[b] for b in rows], pos, [p + T] * len(rows), 4))
        with torch.no_grad():
            g = ref_model.mtp_hidden(
                1, h[rows, p : p + T], ids[rows, p + 1 : p + 1 + T], pos, caches[1], True
            )
        return g.flatten(0, 1)

    for rows, p, T in (([0], 6, 1), ([0, 1], 7, 1), ([0, 1], 8, 2), ([1], 10, 1), ([0], 10, 2)):
        tok = [ids[b, p + 1 : p + 1 + T].tolist() for b in rows]
        got = fast.mtp_forward(
            h[rows, p : p + T].flatten(0, 1), tok, [p] * len(rows), [tables[b] for b in rows]
        )
        want = reference(rows, p, T)
        assert (got - want).abs().max() <= 1e-5
        assert torch.equal(model.mtp[0].block.mlp.last_counts, ref_model.mtp[0].block.mlp.last_counts)


@pytest.mark.parametrize("n", [3, 1], ids=["batched", "lone"])
@pytest.mark.parametrize("variant", ["tiny", "v3_geometry"])
def test_fast_mtp_latents_and_the_taken_row_equal_the_model_mtp_module(tiny, variant, n):
    """Prompt chunks through MTP module 1 as the engine runs them (`ModelRunner.mtp_hidden`): a chunk
    that drafts nothing writes every position's cache row alone (`mtp_latents`); the chunk a draft is
    taken from writes the rows before its last position alone and runs the module on the last
    (`mtp_forward`). Against the model's MTP module over the whole chunks: n rows (of 3, one with its
    blocks out of order), 6 tokens then 4 over the cached 6: the MTP layer's cache rows and the last
    position's output within 1e-5, the same `last_counts` as the model's on that position."""
    model = _model(tiny.replace(**VARIANTS[variant]))
    ref_model = copy.deepcopy(model)
    caches = [PagedLatentCache(model.config, num_blocks=20, block_size=4) for _ in range(2)]
    fast = FastDecoder(model, caches[0])
    tables = [caches[0].allocator.allocate(3) for _ in range(3)]
    tables[1] = tables[1][::-1]
    tables = tables[:n] if n > 1 else tables[1:2]
    ids = torch.randint(0, tiny.vocab_size, (n, 11))
    with torch.no_grad():
        h = ref_model.hidden_states(ids[:, :10])
        for a, b, take in ((0, 6, None), (6, 10, [3] * n)):
            nxt = ids[:, a + 1 : b + 1].tolist()
            fast.mtp_latents(h[:, a:b].flatten(0, 1), nxt, [a] * n, tables, take)
            pos = torch.arange(a, b).expand(n, -1)
            caches[1].bind(make_context(tables, pos, [b] * n, 4))
            want = ref_model.mtp_hidden(1, h[:, a:b], ids[:, a + 1 : b + 1], pos, caches[1], absorb=False)
            if take is not None:
                got = fast.mtp_forward(h[:, b - 1], [[t[-1]] for t in nxt], [b - 1] * n, tables)
                last = want[:, -1]
                assert (got - last).abs().max() <= 1e-5 * max(1.0, last.abs().max().item())
                pos = torch.full((n, 1), b - 1)  # the model's counts on the last position alone
                caches[1].bind(make_context(tables, pos, [b] * n, 4))
                ref_model.mtp_hidden(1, h[:, b - 1 : b], ids[:, b : b + 1], pos, caches[1], absorb=True)
                assert torch.equal(model.mtp[0].block.mlp.last_counts, ref_model.mtp[0].block.mlp.last_counts)
    L = model.config.n_layers  # the MTP layer's pool follows the main layers'
    slots = torch.tensor([t[p // 4] * 4 + p % 4 for t in tables for p in range(10)])
    rows, ref_rows = caches[0].data[L, slots], caches[1].data[L, slots]
    assert rows.abs().sum() > 0
    assert (rows - ref_rows).abs().max() <= 1e-5 * max(1.0, ref_rows.abs().max().item())


def _engines(model: Transformer, **options) -> tuple[Engine, Engine, Transformer]:
    """A fast engine on `model` and a reference engine on an identical copy (so that each has its
    own `last_counts`)."""
    ref_model = copy.deepcopy(model)
    config = dict(num_blocks=64, block_size=4, max_num_batched_tokens=6, **options)
    return (
        Engine(model, EngineConfig(**config)),
        Engine(ref_model, EngineConfig(fast_decode=False, **config)),
        ref_model,
    )


def _step_all(engine: Engine, prompts, params) -> dict:
    for p in prompts:
        engine.add_request(p, params)
    outs, counts = {}, []
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
        counts.append(
            [m.last_counts.clone() for m in engine.model.moe_layers()[: engine.model.config.n_moe_layers]]
        )
    return outs, counts


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_engine_fast_path_equals_reference_engine(tiny, monkeypatch, native):
    """Continuous batching with chunked prefill: the same tokens, logprobs within 1e-5 and the same
    `MoE.last_counts` after every step; both cache layouts were used (with native kernels, a lone
    sequence runs on the RowDecoder instead of a pool slice)."""
    used = {"slice": 0, "gathered": 0}

    class Slice(decode.SliceKeys):
        def __init__(self, *a):
            super().__init__(*a)
            used["slice"] += 1

    class Gathered(decode.GatheredKeys):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            used["gathered"] += 1

    monkeypatch.setattr(decode, "SliceKeys", Slice)
    monkeypatch.setattr(decode, "GatheredKeys", Gathered)
    if not native:
        monkeypatch.setattr(decode, "kernels", lambda native=True: cpu_kernels.Reference())
    fast, ref, _ = _engines(_model(tiny))
    # decodes and prefill chunks apart, as the reference runs them, so that `last_counts` after a
    # step is the same forward's (merged: test_engine_merges_decodes_and_prefill_chunks)
    monkeypatch.setattr(fast, "_merged_forward", lambda *args: None)
    rows = fast.runner.fast.kernels.name == "native"
    prompts = [torch.randint(0, tiny.vocab_size, (n,)).tolist() for n in (5, 13, 3)]
    got, got_counts = _step_all(fast, prompts[:1], GREEDY)  # alone: a pool slice
    want, want_counts = _step_all(ref, prompts[:1], GREEDY)
    more, more_counts = _step_all(fast, prompts, GREEDY)  # batched and chunked: gathered keys
    want_more, want_more_counts = _step_all(ref, prompts, GREEDY)
    assert used["gathered"] > 0
    assert (
        (fast.runner.fast._rows is not None and fast.runner.fast._rows[0] is not None)
        if rows
        else used["slice"] > 0
    )
    for a, b in ((got, want), (more, want_more)):
        assert a.keys() == b.keys()
        for rid in a:
            assert a[rid].token_ids == b[rid].token_ids
            for la, lb in zip(a[rid].logprobs, b[rid].logprobs):
                assert la.keys() == lb.keys() and all(abs(la[t] - lb[t]) <= 1e-5 for t in la)
    for ca, cb in ((got_counts, want_counts), (more_counts, want_more_counts)):
        assert all(torch.equal(x, y) for step_a, step_b in zip(ca, cb) for x, y in zip(step_a, step_b))


@pytest.mark.parametrize("k", [1, 2])
def test_speculative_verification_on_the_fast_path(tiny, k):
    """MTP drafts verified by the fast path: greedy output equals plain greedy decoding, the
    logprobs equal the reference engine's, and drafting (which reads the verified hidden states)
    proposes the same drafts (same acceptance)."""
    model = _model(tiny)
    fast, ref, _ = _engines(model, speculative=True, num_speculative_tokens=k)
    prompts = [torch.randint(0, tiny.vocab_size, (n,)).tolist() for n in (5, 11)]
    got, _ = _step_all(fast, prompts, GREEDY)
    want, _ = _step_all(ref, prompts, GREEDY)
    plain, _ = _step_all(Engine(model, EngineConfig(num_blocks=64, block_size=4)), prompts, GREEDY)
    for rid in want:
        assert got[rid].token_ids == want[rid].token_ids == plain[rid].token_ids
        for la, lb in zip(got[rid].logprobs, want[rid].logprobs):
            assert la.keys() == lb.keys() and all(abs(la[t] - lb[t]) <= 1e-5 for t in la)
    assert fast.spec_stats.acceptance_rates == ref.spec_stats.acceptance_rates


def test_fast_path_follows_in_place_weight_changes(tiny):
    model = _model(tiny)
    fast, ref, ref_model = _engines(model)
    prompt = [torch.randint(0, tiny.vocab_size, (6,)).tolist()]
    _step_all(fast, prompt, GREEDY)
    with torch.no_grad():
        for m in (model, ref_model):  # e.g. a fine-tuning step, or load_state_dict, after start-up
            m.layers[1].mlp.experts.w1.mul_(3.0)
            m.layers[0].self_attn.q_a_proj.weight.mul_(-2.0)
            m.norm.weight.add_(0.5)
    assert fast.runner.fast.weights.stale()
    got, _ = _step_all(fast, prompt, GREEDY)
    want, _ = _step_all(ref, prompt, GREEDY)
    assert got["1"].token_ids == want["0"].token_ids
    for m in (model, ref_model):  # routing biases: updated in place (training), then replaced
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.add_(torch.linspace(-0.3, 0.3, tiny.n_routed_experts))
    got, _ = _step_all(fast, prompt, GREEDY)
    want, _ = _step_all(ref, prompt, GREEDY)
    assert got["2"].token_ids == want["1"].token_ids


def test_row_decoder_follows_a_replaced_routing_bias(tiny):
    """The native RowDecoder holds tensors, not modules: a routing bias replaced by a new tensor
    (not updated in place) must rebuild it."""
    model = _model(tiny)
    cache = PagedLatentCache(model.config, num_blocks=40, block_size=4)
    fast = FastDecoder(model, cache)
    if fast._row_decoders()[0] is None:
        pytest.skip(f"no native RowDecoder here ({cpu_kernels.why_not_native})")
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias = torch.linspace(0.4, -0.4, tiny.n_routed_experts)
    assert_decode_matches_forward(model, cache, fast, torch.randint(0, tiny.vocab_size, (1, 12)))


def test_fast_path_steps_aside_for_hooks_and_module_swaps(tiny):
    model = _model(tiny)
    fast, ref, _ = _engines(model)
    prompt = [torch.randint(0, tiny.vocab_size, (6,)).tolist()]
    want, _ = _step_all(ref, prompt, GREEDY)
    calls = []
    handle = model.moe_layers()[0].register_forward_hook(lambda *a: calls.append(1))
    assert not fast.runner.fast.usable()
    got, _ = _step_all(fast, prompt, GREEDY)
    assert len(calls) == GREEDY.max_tokens  # the prefill and every decode step ran the module
    assert got["0"].token_ids == want["0"].token_ids
    handle.remove()
    assert fast.runner.fast.usable()
    attn = model.layers[0].self_attn
    twin = nn.Linear(attn.o_proj.in_features, attn.o_proj.out_features, bias=False)
    twin.weight = attn.o_proj.weight
    attn.o_proj = twin  # as an FP8 or EPLB swap would do
    assert not fast.runner.fast.usable()
    got, _ = _step_all(fast, prompt, GREEDY)
    assert got["1"].token_ids == want["0"].token_ids


def test_fold_rule_folds_the_small_presets_and_not_v3():
    cases = (
        ("tiny", (True, True)),
        ("small", (True, True)),
        ("v3-mini", (False, True)),
        ("671b", (False, False)),
    )
    for name, expected in cases:
        c = ModelConfig.from_preset(name)
        assert (
            folds(c.q_lora_rank or c.dim, c.dim, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank) == expected
        )
    # many rows fold only what costs no more multiply-adds: v3-mini's o_proj (2x the pair) stays unfolded
    c = ModelConfig.from_preset("v3-mini")
    assert folds(c.q_lora_rank, c.dim, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank, 1.0) == (
        False,
        False,
    )


def test_decode_moe_sets_last_counts_like_moe(tiny):
    moe = _model(tiny).moe_layers()[0]
    x = torch.randn(3, tiny.dim)
    with torch.no_grad():
        want = moe(x[None])
        counts = moe.last_counts.clone()
        moe.last_counts.zero_()
        moe.__class__ = DecodeMoE
        got = moe(x[None])
    assert torch.equal(moe.last_counts, counts) and int(counts.sum()) == 3 * tiny.n_activated_experts
    assert (got - want).abs().max() <= 1e-6
    moe.__class__ = MoE


@pytest.mark.parametrize(
    "preset, B, gemm",
    [("tiny", 5, "fp32"), ("tiny", 5, "aten"), ("v3-mini", 64, "fp32"), ("v3-mini", 64, "bf16")],
    ids=["tiny-b5", "tiny-b5-aten", "v3mini-b64", "v3mini-b64-bf16-gemm"],
)
def test_fast_prefill_equals_the_model_forward(preset, B, gemm):
    """Chunked prefill on the fast path (`FastDecoder.prefill`: absorbed attention over the paged
    cache, fused projections, grouped experts) against the model's naive-MLA forward: B rows (every
    other row's blocks out of order) prefilled in two chunks (6 tokens, then 4 over the cached 6):
    final hidden states of every token and the latent cache rows written within 1e-5 (FP32 GEMMs,
    on oneDNN-packed weights, or ATen's ("aten": the model's forward runs, `prefill_pays`);
    BF16 GEMMs where the CPU has BF16 arithmetic, on a BF16-valued model: within BF16_GEMM_BOUND
    but for at most 2% of the tokens, where rounding flipped a near-tie in the top-k routing), and
    the same `last_counts`."""
    plan = cpu_kernels.plan_kernels()
    if gemm == "bf16" and not plan.bf16_gemm:
        pytest.skip(f"no BF16 arithmetic on this CPU ({plan.kind}: {' '.join(plan.flags)})")
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset)
    if preset == "v3-mini":
        cfg = cfg.replace(n_layers=2, vocab_size=512, n_mtp_layers=0)
    model = _model(cfg) if gemm != "bf16" else _bf16_valued(_model(cfg))
    dtype = torch.bfloat16 if gemm == "bf16" else None
    caches = [PagedLatentCache(cfg, num_blocks=B * 3 + 4, block_size=4) for _ in range(2)]
    fast = FastDecoder(model, caches[0], weight_dtype=dtype, bf16_gemm=gemm == "bf16", packed=gemm != "aten")
    tables = [caches[0].allocator.allocate(3) for _ in range(B)]
    tables[1::2] = [t[::-1] for t in tables[1::2]]
    ids = torch.randint(0, cfg.vocab_size, (B, 10))
    bound = 1e-5 if gemm != "bf16" else BF16_GEMM_BOUND
    beyond = 0
    with torch.no_grad():
        for a, b in ((0, 6), (6, 10)):
            # FP32: this path on oneDNN-packed weights, else (ATen GEMMs) the model's forward runs
            assert fast.prefill_pays(B, b - a, b) == (gemm == "bf16" or fast._packed)
            got = fast.prefill(ids[:, a:b].tolist(), [a] * B, tables)  # (B, T, D)
            got_counts = [m.last_counts.clone() for m in model.moe_layers()[: cfg.n_moe_layers]]
            pos = torch.arange(a, b).expand(B, -1)
            caches[1].bind(make_context(tables, pos, [b] * B, 4))
            want = model.hidden_states(ids[:, a:b], pos, caches[1], absorb=False)
            for g, w in zip(got.flatten(0, 1), want.flatten(0, 1)):  # per token
                beyond += bool((g - w).abs().max() > bound * max(1.0, w.abs().max().item()))
            if gemm != "bf16":
                assert all(torch.equal(c, m.last_counts) for c, m in zip(got_counts, model.moe_layers()))
    slots = torch.tensor([blk * 4 + i for t in tables for blk in t for i in range(4)])
    rows, ref_rows = caches[0].data[:, slots], caches[1].data[:, slots]
    assert (rows - ref_rows).abs().max() <= bound * max(1.0, ref_rows.abs().max().item())
    assert beyond <= (0 if gemm != "bf16" else B * 10 // 50)  # BF16: seen 8 of 640 tokens, 95% < 7e-3


@pytest.mark.parametrize("preset, Bd", [("tiny", 0), ("tiny", 1), ("tiny", 3), ("v3-mini", 3)])
def test_mixed_forward_equals_decode_and_prefills_apart(preset, Bd):
    """`FastDecoder.mixed` (plain decodes and two prefill chunks of different lengths, one of them
    continuing a cached prefix, in one forward) against `forward` and `prefill` apart on a copy:
    the decodes' logits and the chunks' hidden states within 1e-5, the same cache rows, and
    `last_counts` the sum of the forwards' (one decode row: its keys a pool slice; several: the
    paged attention; none: the chunks alone; v3-mini keeps W_UK / W_UV apart, so its chunks run
    the naive attention, tiny's the absorbed one)."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset)
    if preset == "v3-mini":
        cfg = cfg.replace(n_layers=2, vocab_size=512, n_mtp_layers=0)
    models = [_model(cfg)]
    models.append(copy.deepcopy(models[0]))
    caches = [PagedLatentCache(cfg, num_blocks=32, block_size=4) for _ in range(2)]
    fasts = [FastDecoder(m, c) for m, c in zip(models, caches)]
    if not fasts[0].prefill_pays(1, 6, 6):
        pytest.skip(f"prefill chunks do not run on the fast path here ({fasts[0]._aten.__class__.__name__})")
    assert (fasts[0].weights.attn[0].many.w_kvb is not None) == (preset == "v3-mini")
    d_tables = [caches[0].allocator.allocate(3) for _ in range(Bd)]
    a_tables = [caches[0].allocator.allocate(2)[::-1] for _ in range(2)]  # out of order
    b_tables = [caches[0].allocator.allocate(3)]
    ids = lambda rows, n: torch.randint(0, cfg.vocab_size, (rows, n)).tolist()  # noqa: E731
    context, b_context = ids(Bd, 6), ids(1, 6)
    for f in fasts:  # the decodes' contexts and chunk B's cached prefix
        if Bd:
            f.prefill(context, [0] * Bd, d_tables)
        f.prefill(b_context, [0], b_tables)
    decode = (ids(Bd, 1), [6] * Bd, d_tables) if Bd else None
    chunks = [(ids(2, 5), [0, 0], a_tables), (ids(1, 3), [6], b_tables)]
    moes = [m.moe_layers()[: cfg.n_moe_layers] for m in models]
    x, hidden = fasts[0].mixed(decode, chunks)
    got_counts = [m.last_counts.clone() for m in moes[0]]
    want_counts = [torch.zeros_like(c) for c in got_counts]
    want_x = None
    if Bd:
        want_x = fasts[1].forward(*decode)
        want_counts = [c + m.last_counts for c, m in zip(want_counts, moes[1])]
    want_hidden = []
    for chunk in chunks:
        want_hidden.append(fasts[1].prefill(*chunk))
        want_counts = [c + m.last_counts for c, m in zip(want_counts, moes[1])]
    pairs = list(zip(hidden, want_hidden))
    assert [h.shape for h in hidden] == [(2, 5, cfg.dim), (1, 3, cfg.dim)]
    if Bd:
        pairs.append((fasts[0].logits(x), fasts[1].logits(want_x)))
        assert pairs[-1][0].shape == (Bd, cfg.vocab_size)
    else:
        assert x is None
    for got, want in pairs:
        assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
    assert all(torch.equal(a, b) for a, b in zip(got_counts, want_counts))
    assert sum(c.sum().item() for c in got_counts) == (Bd + 13) * cfg.n_activated_experts * len(got_counts)
    assert (caches[0].data - caches[1].data).abs().max() <= 1e-5 * max(1.0, caches[1].data.abs().max().item())


def test_engine_merges_decodes_and_prefill_chunks(tiny, monkeypatch):
    """Two requests of different lengths arriving every step while the earlier ones decode: their
    prompt chunks and the running decodes run as one forward (`Engine._merged_forward`; the first
    step: the two chunks alone), with the same greedy tokens and logprobs within 1e-5 as the
    engine running them apart."""
    model = _model(tiny)
    config = EngineConfig(num_blocks=96, block_size=4, max_num_batched_tokens=48)
    engines = [Engine(model, config), Engine(copy.deepcopy(model), config)]
    if not engines[0].runner.fast.prefill_pays(1, 7, 7):
        pytest.skip("prefill chunks do not run on the fast path here")
    merged = {"n": 0}
    real = Engine._merged_forward

    def spy(self, *args):
        out = real(self, *args)
        merged["n"] += out is not None
        return out

    monkeypatch.setattr(Engine, "_merged_forward", spy)
    monkeypatch.setattr(engines[1], "_merged_forward", lambda *args: None)
    lens = [(9, 7), (12, 8), (10, 13)]
    prompts = [[torch.randint(0, tiny.vocab_size, (n,)).tolist() for n in pair] for pair in lens]
    outs = []
    for engine in engines:
        done, arrivals = {}, list(prompts)
        while arrivals or engine.has_unfinished():
            if arrivals:  # two new requests every step, while the earlier ones decode
                for p in arrivals.pop(0):
                    engine.add_request(p, GREEDY)
            done.update({o.request_id: o for o in engine.step() if o.finished})
        outs.append(done)
    assert merged["n"] == len(lens)
    assert outs[0].keys() == outs[1].keys() and len(outs[0]) == 2 * len(lens)
    for rid, a in outs[0].items():
        b = outs[1][rid]
        assert a.token_ids == b.token_ids and len(a.token_ids) == GREEDY.max_tokens
        for la, lb in zip(a.logprobs, b.logprobs):
            assert la.keys() == lb.keys() and all(abs(la[t] - lb[t]) <= 1e-5 for t in la)
