"""The native few-row kernels (dsv3.infer.decode.kernels, csrc/few_rows.cpp) held to the torch
reference of the same contract: FP32 and BF16 weights, column tails, strided views, accumulation,
the routed experts; bad inputs fail with the argument's name. The one-call RowDecoder is held to
the model's forward in test_infer_fast."""

import warnings
from pathlib import Path

import pytest
import torch

from dsv3.infer.decode import kernels as cpu_kernels

REF = cpu_kernels.Reference()


def test_native_kernels_build_on_an_avx2_cpu():
    """Where the CPU qualifies the kernel must build: a silent fallback would hide a broken build."""
    if cpu_kernels._unavailable() is not None:
        pytest.skip(cpu_kernels._unavailable())
    assert cpu_kernels.kernels().name == "native", cpu_kernels.why_not_native
    assert cpu_kernels.kernels(native=False).name == "torch"


def _close(a: torch.Tensor, b: torch.Tensor, K: int) -> None:
    # FP32 sums of K products in another order: a few ulps of the terms' magnitude
    assert (a - b).abs().max() <= 1e-6 * K * max(1.0, b.abs().max().item()) ** 0.5 * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K,N", [(1, 256, 256), (3, 64, 1030), (2, 7, 5), (1, 130, 77), (4, 16, 8)])
def test_mm_and_addmm_match_the_reference(native, dtype, M, K, N):
    g = torch.Generator().manual_seed(M * K + N)
    x, w = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g).to(dtype)
    bias = torch.randn(M, N, generator=g)
    _close(native.mm(x, w), REF.mm(x, w), K)
    _close(native.mm(x, w, bias), REF.mm(x, w, bias), K)
    out, ref = bias.clone(), bias.clone()
    native.addmm_(out, x, w, -0.5)
    REF.addmm_(ref, x, w, -0.5)
    _close(out, ref, K)
    assert torch.equal(REF.mm(x, w), x @ w.float())  # the reference widens BF16 exactly


def test_views_with_row_strides(native):
    """A column slice of a wider weight (the draft vocabulary's head), rows of a wider activation
    and an output slice: only the column stride must be 1."""
    w = torch.randn(64, 300).bfloat16()[:, 10:210]
    x = torch.randn(3, 100)[:, 20:84]
    base = torch.randn(3, 400)
    out, ref = base.clone(), base.clone()
    native.addmm_(out[:, 50:250], x, w, 2.0)
    REF.addmm_(ref[:, 50:250], x, w, 2.0)
    _close(out, ref, 64)
    assert torch.equal(out[:, :50], base[:, :50]) and torch.equal(out[:, 250:], base[:, 250:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_match_the_reference(native, dtype):
    g = torch.Generator().manual_seed(0)
    E, D, H = 16, 64, 24  # experts, dim, expert hidden size
    w13, w2 = torch.randn(E, D, 2 * H, generator=g).to(dtype), torch.randn(E, H, D, generator=g).to(dtype)
    xn = torch.randn(3, D, generator=g)
    ids = [3, 5, 1, 3, 9, 15]  # 2 per row; rows 0 and 1 both choose expert 3
    gates = [0.1, 0.7, 1.3, 0.2, 0.5, 0.9]
    base = torch.randn(3, D, generator=g)
    out, ref = base.clone(), base.clone()
    native.experts_(out, xn, w13, w2, ids, gates)
    REF.experts_(ref, xn, w13, w2, ids, gates)
    _close(out, ref, D * H)
    one, ref1 = base[:1].clone(), base[:1].clone()
    native.experts_(one, xn[:1], w13, w2, ids[:2], gates[:2])
    REF.experts_(ref1, xn[:1], w13, w2, ids[:2], gates[:2])
    _close(one, ref1, D * H)


def test_bad_inputs_name_the_argument(native):
    w = torch.randn(8, 8)
    with pytest.raises(RuntimeError, match="x: expected float32"):
        native.mm(torch.randn(1, 8, dtype=torch.float64), w)
    with pytest.raises(RuntimeError, match="w: 4 rows for 8 inputs"):
        native.mm(torch.randn(1, 8), torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="w: expected a 2-d tensor with unit column stride"):
        native.mm(torch.randn(1, 8), w.T)
    with pytest.raises(RuntimeError, match="ids: expert 16 out of range"):
        native.experts_(
            torch.zeros(1, 8), torch.randn(1, 8), torch.randn(16, 8, 4), torch.randn(16, 2, 8), [16], [1.0]
        )


def _name_kernels_would_build(monkeypatch, source_text: str, tmp_path, attr: str = "SOURCE") -> str:
    """The extension name `kernels()` passes to torch's builder for a checkout whose kernel source
    (`attr`: SOURCE, PAGED_SOURCE or HEADER) is `source_text` (the builder is replaced: nothing is
    compiled)."""
    import types

    import torch.utils.cpp_extension as ext

    source = tmp_path / f"few_rows_{abs(hash(source_text))}.cpp"
    source.write_text(source_text)
    names = []

    def fake_load(name, sources, **kwargs):
        names.append(name)
        return types.SimpleNamespace(
            mm=None,
            addmm_=None,
            experts_=None,
            RowDecoder=None,
            paged_attend=None,
            amx_ready=lambda: False,
            amx_pack=None,
            amx_mm=None,
            amx_grouped=None,
            pack_strips=None,
            strips_mm=None,
            strips_bmm=None,
            strips_experts_=None,
        )

    monkeypatch.setattr(ext, "load", fake_load)
    monkeypatch.setattr(cpu_kernels, attr, source)
    monkeypatch.setattr(cpu_kernels, "_unavailable", lambda: None)
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setattr(cpu_kernels, "why_not_native", cpu_kernels.why_not_native)  # restored after
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))  # not the real cache
    cpu_kernels.kernels()
    assert len(names) == 1
    return names[0]


def test_build_is_keyed_by_the_source(monkeypatch, tmp_path):
    """torch caches extensions by name only: two checkouts with different kernel sources must build
    under different names (else each start rebuilds over the other's ~45 s build), the same source
    under the same name (else nothing is ever reused)."""
    a = _name_kernels_would_build(monkeypatch, "// checkout A\n", tmp_path)
    b = _name_kernels_would_build(monkeypatch, "// checkout B\n", tmp_path)
    a_again = _name_kernels_would_build(monkeypatch, "// checkout A\n", tmp_path)
    assert a != b
    assert a == a_again
    assert a.isidentifier() and a.startswith("dsv3_few_rows_")


@pytest.mark.parametrize("attr", ["PAGED_SOURCE", "HEADER"])
def test_build_is_keyed_by_every_file_of_the_build(monkeypatch, tmp_path, attr):
    """The attention source and the shared header are compiled in too: changing either is a new build."""
    a = _name_kernels_would_build(monkeypatch, "// version A\n", tmp_path, attr)
    b = _name_kernels_would_build(monkeypatch, "// version B\n", tmp_path, attr)
    assert a != b


def test_build_name_covers_the_flags_and_the_torch_version():
    src = cpu_kernels.SOURCE.read_bytes()
    name = cpu_kernels.build_name(src)
    assert name == cpu_kernels.build_name(src)
    assert name != cpu_kernels.build_name(src, cflags=("-O2", "-mavx2", "-mfma"))
    assert name != cpu_kernels.build_name(src, torch_version=torch.__version__ + "+other")
    assert name != cpu_kernels.build_name(src, ldflags=())  # e.g. built without OpenMP
    assert name != cpu_kernels.build_name(src + b" ")
    # another checkout of the same source: its own build directory (torch's build.ninja names the path)
    assert name != cpu_kernels.build_name(src, path=Path("/elsewhere/few_rows.cpp"))


def test_a_build_lock_left_by_a_killed_build_is_removed(tmp_path):
    """torch's `lock` file outlives a build that was killed, and every later start waited on it
    forever; under our flock (released when its holder dies) such a file is stale and removed."""
    directory = tmp_path / "ext"
    directory.mkdir()
    (directory / "lock").write_text("")
    with pytest.warns(UserWarning, match="interrupted kernel build"):
        with cpu_kernels.build_lock(directory) as d:
            assert d == directory and not (directory / "lock").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing stale now: no warning
        with cpu_kernels.build_lock(directory):
            pass


def test_build_directory_follows_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    d = cpu_kernels.build_directory("dsv3_few_rows_x")
    assert d.parent.parent == tmp_path and d.name == "dsv3_few_rows_x"


def test_cpu_flags_reads_the_flags_line():
    text = "processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse avx2 fma avx512f amx_tile amx_bf16\n"
    assert cpu_kernels.cpu_flags(text) == ["avx2", "fma", "avx512f", "amx_tile", "amx_bf16"]
    assert cpu_kernels.cpu_flags("processor\t: 0\n") == []
    assert "torch capability" in cpu_kernels.describe_cpu()


def _at_threads(n: int, fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_and_experts_do_not_depend_on_the_thread_count(native, dtype):
    """Sizes large enough to be split (columns in runs of 64, experts' w1 | w3 and w2 columns), with a
    column tail (N % 8 != 0): 1 and 2 threads give bit-identical results, both close to the reference."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(3, 256, generator=g), torch.randn(256, 1030, generator=g).to(dtype)
    one, two = (_at_threads(n, lambda: native.mm(x, w)) for n in (1, 2))
    assert torch.equal(one, two)
    _close(two, REF.mm(x, w), 256)
    E, D, H = 8, 512, 132  # 2I = 264: a partial run of columns
    w13 = torch.randn(E, D, 2 * H, generator=g).to(dtype)
    w2 = torch.randn(E, H, D, generator=g).to(dtype)
    xn, base = torch.randn(3, D, generator=g), torch.randn(3, D, generator=g)
    ids, gates = [4, 1, 4, 7, 0, 1], [0.3, 0.9, 1.1, 0.2, 0.6, 0.4]

    def experts() -> torch.Tensor:
        out = base.clone()
        native.experts_(out, xn, w13, w2, ids, gates)
        return out

    one, two = (_at_threads(n, experts) for n in (1, 2))
    assert torch.equal(one, two)
    ref = base.clone()
    REF.experts_(ref, xn, w13, w2, ids, gates)
    _close(two, ref, D * H)


def test_kernel_plan_follows_the_cpu_flags():
    assert cpu_kernels.plan_kernels(["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"]).kind == "amx-bf16"
    assert cpu_kernels.plan_kernels(["avx2", "fma", "avx512_bf16"]).kind == "avx512-bf16"
    avx2 = cpu_kernels.plan_kernels(["avx2", "fma"])
    assert avx2.kind == "avx2-fp32" and not avx2.bf16_gemm
    assert cpu_kernels.plan_kernels([]).kind == "generic-fp32"
    assert "FP32 GEMMs" in avx2.line("native", True, False)


def test_kernel_plan_line_names_the_row_splits():
    amx = cpu_kernels.plan_kernels(["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"])
    line = amx.line("native", True, True, packed=True, amx_rows=32, kernel_rows=4)
    assert "up to 4 rows: native kernels" in line
    assert "AMX tiles up to 32 rows, for the routed experts and per-head W_UK / W_UV, else oneDNN" in line
    assert "AMX" not in amx.line("native", True, True, packed=True)
