"""The fused preconditioned update (triton_kernels/update.py) against a float64 G^-1 V A^-1 and epilogue
written here.

Without CUDA the kernel runs in Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1), with 16-wide
tiles so that out = 19, in = 23 (or 5 x 33) span several tiles with ragged edges. The written tensors are
views into larger buffers, so that a store outside them would show. The CUDA tests at the end run the
compiled kernel at its default tiles (and the small ones) and skip without a device.
"""

from __future__ import annotations

import math

import pytest
import torch
from devices import DEVICE, requires_cuda

from kronograph.triton_kernels import update
from kronograph.triton_kernels.update import fused_update, fused_update_reference, fused_update_triton

pytestmark = pytest.mark.usefixtures("one_thread", "on_kernel_device")

SMALL = (16, 16, 16)
F64 = torch.float64
SHAPES = [(1, 19, 23), (3, 19, 23), (2, 5, 33)]  # (groups, out, in)
SENTINEL = 1234.5


def operands(groups, out, inn, dtype=torch.float32, inverse_dtype=None, device=DEVICE, seed=0):
    """g_inv [g, out, out], v [g, out, in], a_inv [g, in, in] with entries of order 1/sqrt(d) in the
    inverses, so that U = G^-1 V A^-1 is of order 1."""
    generator = torch.Generator(DEVICE).manual_seed(seed)
    inverse_dtype = inverse_dtype or dtype
    g_inv = torch.randn(groups, out, out, generator=generator) / math.sqrt(out)
    v = torch.randn(groups, out, inn, generator=generator)
    a_inv = torch.randn(groups, inn, inn, generator=generator) / math.sqrt(inn)
    return g_inv.to(device, inverse_dtype), v.to(device, dtype), a_inv.to(device, inverse_dtype)


def embedded(groups, out, inn, dtype=torch.float32, device=DEVICE, seed=1, fill=None):
    """(buffer, view): a [groups, out, in] view strictly inside a sentinel-filled [groups, out + 2, in + 3]
    buffer (not contiguous), holding random values (or ``fill``)."""
    generator = torch.Generator(DEVICE).manual_seed(seed)
    buffer = torch.full((groups, out + 2, inn + 3), SENTINEL, dtype=dtype, device=device)
    view = buffer[:, 1:out + 1, 2:inn + 2]
    values = torch.randn(groups, out, inn, generator=generator) if fill is None else torch.full(view.shape, fill)
    view.copy_(values)
    return buffer, view


def outside(buffer: torch.Tensor, out: int, inn: int) -> torch.Tensor:
    mask = torch.ones(buffer.shape, dtype=torch.bool, device=buffer.device)
    mask[:, 1:out + 1, 2:inn + 2] = False
    return buffer[mask]


def expected(g_inv, v, a_inv, scale, previous=None, momentum=0.0, param=None, weight_decay=0.0, lr=1.0):
    """(delta, param + lr delta) in float64 from the operands' values, elementwise by hand."""
    u = torch.einsum("gij,gjk,gkl->gil", g_inv.cpu().double(), v.cpu().double(), a_inv.cpu().double())
    delta = scale * u
    if momentum:
        delta = delta + momentum * previous.cpu().double()
    if weight_decay:
        delta = delta + weight_decay * param.cpu().double()
    return delta, None if param is None else param.cpu().double() + lr * delta


def assert_near(actual: torch.Tensor, wanted: torch.Tensor, rel: float = 1e-5, rounding: float = 0.0) -> None:
    """|actual - wanted| <= rel * (largest |wanted| of the group, at least 1) + rounding * |wanted|: float32
    accumulation, plus the one rounding of a 16-bit output (rounding = its unit roundoff, doubled)."""
    wanted = wanted.double()
    scale = wanted.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1.0)
    error = (actual.cpu().double() - wanted).abs()
    bound = rel * scale + rounding * wanted.abs()
    assert torch.isfinite(actual).all()
    assert torch.all(error <= bound), f"max error {error.max():.3g}, max excess {(error - bound).max():.3g}"


#: (name, previous given, momentum, param given, weight_decay, write)
TERMS = [
    ("plain", False, 0.0, False, 0.0, True),
    ("fresh previous", True, 0.0, False, 0.0, True),  # momentum 0: previous holds NaN and must not be read
    ("momentum", True, 0.9, False, 0.0, True),
    ("param", False, 0.0, True, 0.0, True),
    ("decay", False, 0.0, True, 0.01, True),
    ("all", True, 0.9, True, 0.01, True),
    ("all, no write", True, 0.9, True, 0.01, False),
]


@pytest.mark.parametrize("run", [fused_update_triton, fused_update_reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("terms", TERMS, ids=[t[0] for t in TERMS])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_matches_float64(shape, terms, run):
    groups, out, inn = shape
    _, has_previous, momentum, has_param, weight_decay, write = terms
    g_inv, v, a_inv = operands(*shape, seed=out * inn + groups)
    inputs = [t.clone() for t in (g_inv, v, a_inv)]
    prev_buffer, previous = embedded(*shape, seed=2, fill=float("nan") if has_previous and not momentum else None)
    param_buffer, param = embedded(*shape, seed=3)
    prev_before, param_before = prev_buffer.clone(), param_buffer.clone()
    previous, param = (previous if has_previous else None), (param if has_param else None)
    wanted, wanted_param = expected(g_inv, v, a_inv, -0.5, previous, momentum, param, weight_decay, lr=0.1)

    delta = run(g_inv, v, a_inv, scale=-0.5, previous=previous, momentum=momentum, param=param,
                weight_decay=weight_decay, lr=0.1, write=write, blocks=SMALL)

    assert delta.shape == (groups, out, inn) and delta.dtype == torch.float32
    assert_near(delta, wanted)
    if has_previous:
        assert delta is previous  # previous now holds delta
    assert all(torch.equal(t, before) for t, before in zip((g_inv, v, a_inv), inputs))
    assert torch.equal(outside(prev_buffer, out, inn), outside(prev_before, out, inn))
    assert torch.equal(outside(param_buffer, out, inn), outside(param_before, out, inn))
    if not has_previous:
        assert torch.equal(prev_buffer, prev_before)
    if has_param and write:
        assert_near(param, wanted_param)
    else:
        assert torch.equal(param_buffer, param_before)


def test_float64_operands():
    g_inv, v, a_inv = (t.double() for t in operands(3, 19, 23, seed=4))
    _, previous = embedded(3, 19, 23, dtype=F64, seed=5)
    _, param = embedded(3, 19, 23, dtype=F64, seed=6)
    wanted, wanted_param = expected(g_inv, v, a_inv, 2.0, previous, 0.5, param, 0.1, lr=0.3)
    delta = fused_update_triton(g_inv, v, a_inv, scale=2.0, previous=previous, momentum=0.5, param=param,
                                weight_decay=0.1, lr=0.3, blocks=SMALL)
    assert delta.dtype == F64
    assert_near(delta, wanted, rel=1e-13)
    assert_near(param, wanted_param, rel=1e-13)


LOW = [  # (name, v's dtype, the inverses' dtype, previous's dtype, param's dtype)
    ("bf16", torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16),
    ("bf16 gradient, fp32 inverses", torch.bfloat16, torch.float32, torch.float32, torch.bfloat16),
    ("fp16", torch.float16, torch.float16, torch.float16, torch.float16),
]
UNIT = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


@pytest.mark.parametrize("run", [fused_update_triton, fused_update_reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("dtypes", LOW, ids=[d[0] for d in LOW])
def test_low_precision_accumulates_in_float32(dtypes, run):
    """16-bit operands: the products are exact in float32 and T = V A^-1 is kept in float32, so delta is as
    close to the float64 result as with float32 operands, up to the one rounding into its own dtype."""
    _, v_dtype, inverse_dtype, prev_dtype, param_dtype = dtypes
    g_inv, v, a_inv = operands(2, 19, 23, dtype=v_dtype, inverse_dtype=inverse_dtype, seed=7)
    _, previous = embedded(2, 19, 23, dtype=prev_dtype, seed=8)
    param_buffer, param = embedded(2, 19, 23, dtype=param_dtype, seed=9)
    param_before = param_buffer.clone()
    wanted, wanted_param = expected(g_inv, v, a_inv, -1.0, previous, 0.9, param, 0.01, lr=0.5)
    delta = run(g_inv, v, a_inv, scale=-1.0, previous=previous, momentum=0.9, param=param, weight_decay=0.01,
                lr=0.5, blocks=SMALL)
    assert delta is previous and param.dtype == param_dtype
    assert_near(delta, wanted, rounding=2 * UNIT[prev_dtype])
    assert_near(param, wanted_param, rounding=2 * UNIT[param_dtype])
    assert torch.equal(outside(param_buffer, 19, 23), outside(param_before, 19, 23))
    if prev_dtype == torch.float32:  # the check would catch a T rounded to 16 bits
        t16 = (v.double() @ a_inv.double()).to(v_dtype)
        rounded, _ = expected(g_inv, t16, torch.eye(23, dtype=F64).expand(2, 23, 23), -1.0, previous, 0.9,
                              param, 0.01)
        with pytest.raises(AssertionError):
            assert_near(rounded, wanted)


def test_no_buffers_gives_delta_in_the_working_or_param_dtype():
    g_inv, v, a_inv = operands(2, 19, 23, dtype=torch.bfloat16, seed=10)
    wanted, _ = expected(g_inv, v, a_inv, 3.0)
    delta = fused_update_triton(g_inv, v, a_inv, scale=3.0, blocks=SMALL)
    assert delta.dtype == torch.float32
    assert_near(delta, wanted)
    param = torch.randn(2, 19, 23).bfloat16()
    before = param.clone()
    delta = fused_update_triton(g_inv, v, a_inv, scale=3.0, param=param, write=False, blocks=SMALL)
    assert delta.dtype == torch.bfloat16 and torch.equal(param, before)
    assert_near(delta, wanted, rounding=2 * UNIT[torch.bfloat16])


@pytest.mark.parametrize("run", [fused_update_triton, fused_update_reference], ids=["kernel", "reference"])
def test_strided_operands(run):
    """Transposed views everywhere, and inverses shared by the groups (stride 0 over the group)."""
    generator = torch.Generator(DEVICE).manual_seed(11)
    g_inv = torch.randn(3, 19, 19, generator=generator).transpose(1, 2) / math.sqrt(19)
    v = torch.randn(3, 23, 19, generator=generator).transpose(1, 2)
    a_inv = (torch.randn(1, 23, 23, generator=generator) / math.sqrt(23)).expand(3, 23, 23)
    previous = torch.randn(3, 23, 19, generator=generator).transpose(1, 2)
    param = torch.randn(3, 23, 19, generator=generator).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (g_inv, v, a_inv, previous, param))
    wanted, wanted_param = expected(g_inv, v, a_inv, -0.7, previous, 0.5, param, 0.02, lr=0.2)
    delta = run(g_inv, v, a_inv, scale=-0.7, previous=previous, momentum=0.5, param=param, weight_decay=0.02,
                lr=0.2, blocks=SMALL)
    assert_near(delta, wanted)
    assert_near(previous, wanted)
    assert_near(param, wanted_param)


def test_unread_buffers_may_hold_nan():
    """momentum 0 does not read previous, weight_decay 0 without a write does not read param."""
    g_inv, v, a_inv = operands(2, 19, 23, seed=12)
    wanted, _ = expected(g_inv, v, a_inv, 1.5)
    for run in (fused_update_triton, fused_update_reference):
        previous = torch.full((2, 19, 23), float("nan"))
        param = torch.full((2, 19, 23), float("nan"))
        delta = run(g_inv, v, a_inv, scale=1.5, previous=previous, param=param, write=False, blocks=SMALL)
        assert delta is previous
        assert_near(delta, wanted)
        assert param.isnan().all()


def test_reference_equals_kernel():
    g_inv, v, a_inv = operands(3, 19, 23, dtype=torch.bfloat16, inverse_dtype=torch.float32, seed=13)
    results = []
    for run in (fused_update_triton, fused_update_reference):
        _, previous = embedded(3, 19, 23, seed=14)
        _, param = embedded(3, 19, 23, seed=15)
        delta = run(g_inv, v, a_inv, scale=-0.3, previous=previous, momentum=0.8, param=param,
                    weight_decay=1e-3, lr=0.05, blocks=SMALL)
        results.append((delta, param))
    (delta, param), (delta_ref, param_ref) = results
    torch.testing.assert_close(delta, delta_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(param, param_ref, rtol=1e-5, atol=1e-5)


def test_empty_batches():
    for groups, out, inn in ((0, 19, 23), (2, 19, 0), (2, 0, 5)):
        g_inv, v, a_inv = operands(groups, out, inn)
        for run in (fused_update_triton, fused_update_reference):
            delta = run(g_inv, v, a_inv, scale=1.0, blocks=SMALL)
            assert delta.shape == (groups, out, inn)


def test_dispatch(monkeypatch):
    g_inv, v, a_inv = operands(2, 5, 7, seed=16)
    wanted, _ = expected(g_inv, v, a_inv, -1.0)
    calls = []
    real = update.fused_update_triton

    def spy(*args, **kwargs):
        calls.append("triton")
        return real(*args, **kwargs)

    monkeypatch.setattr(update, "fused_update_triton", spy)
    for backend in ("torch", "auto"):  # "auto": cuBLAS wins on CUDA too (dispatch.AUTO_ON_CUDA), no interpreter
        assert_near(fused_update(g_inv, v, a_inv, scale=-1.0, backend=backend), wanted)
    assert calls == []
    assert_near(fused_update(g_inv, v, a_inv, scale=-1.0, blocks=SMALL, backend="triton"), wanted)
    assert calls == ["triton"]
    with pytest.raises(ValueError, match="backend"):
        fused_update(g_inv, v, a_inv, scale=-1.0, backend="cuda")


def test_rejects_bad_arguments():
    g_inv, v, a_inv = operands(2, 5, 7)
    param = torch.zeros(2, 5, 7)
    for run in (fused_update_triton, fused_update_reference):
        with pytest.raises(ValueError, match=r"g_inv must be \[2, 5, 5\]"):
            run(a_inv, v, a_inv, scale=1.0)
        with pytest.raises(ValueError, match=r"a_inv must be \[2, 7, 7\]"):
            run(g_inv, v, g_inv, scale=1.0)
        with pytest.raises(ValueError, match="v must be a"):
            run(g_inv, v[0], a_inv, scale=1.0)
        with pytest.raises(ValueError, match="previous must be"):
            run(g_inv, v, a_inv, scale=1.0, previous=param[:1])
        with pytest.raises(ValueError, match="int32"):
            run(g_inv, v, a_inv, scale=1.0, param=param.int())
        with pytest.raises(ValueError, match="on meta"):
            run(g_inv, v, a_inv.to("meta"), scale=1.0)
        with pytest.raises(ValueError, match="momentum=0.9 needs previous"):
            run(g_inv, v, a_inv, scale=1.0, momentum=0.9)
        with pytest.raises(ValueError, match="weight_decay=0.1 needs param"):
            run(g_inv, v, a_inv, scale=1.0, weight_decay=0.1)
        with pytest.raises(ValueError, match="param .* share memory with v"):
            run(g_inv, v, a_inv, scale=1.0, param=v)
        with pytest.raises(ValueError, match="previous .* share memory with param"):
            run(g_inv, v, a_inv, scale=1.0, previous=param, param=param)
        with pytest.raises(ValueError, match="expanded"):
            run(g_inv, v, a_inv, scale=1.0, previous=torch.zeros(1, 5, 7).expand(2, 5, 7))
    for run in (fused_update_triton, fused_update_reference):  # param only read: it may alias an operand
        run(g_inv, v, a_inv, scale=1.0, param=v, write=False, blocks=SMALL)
    with pytest.raises(ValueError, match="power of two"):
        fused_update_triton(g_inv, v, a_inv, scale=1.0, blocks=(8, 16, 16))


def test_reference_on_the_meta_device():
    """The runtime's placement tests run steps on torch.device("meta"): shapes only, no memory to overlap."""
    meta = [torch.zeros(shape, device="meta") for shape in ((2, 5, 5), (2, 5, 7), (2, 7, 7), (2, 5, 7), (2, 5, 7))]
    g_inv, v, a_inv, previous, param = meta
    delta = fused_update(g_inv, v, a_inv, scale=1.0, previous=previous, momentum=0.9, param=param,
                         weight_decay=0.1)
    assert delta is previous and delta.device.type == "meta"


def _refuse(*args, **kwargs):
    raise AssertionError("backend='auto' on CUDA tensors must run the kernel")


@requires_cuda
@pytest.mark.parametrize("dtypes", [("fp32",) + (torch.float32,) * 4] + LOW, ids=["fp32"] + [d[0] for d in LOW])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 19, 23), (2, 200, 301), (4, 513, 257)],
                         ids=["1x1x1", "3x19x23", "2x200x301", "4x513x257"])
def test_compiled_kernel_on_cuda(shape, dtypes, monkeypatch):
    monkeypatch.setattr(update, "fused_update_reference", _refuse)
    groups, out, inn = shape
    _, v_dtype, inverse_dtype, prev_dtype, param_dtype = dtypes
    g_inv, v, a_inv = operands(*shape, dtype=v_dtype, inverse_dtype=inverse_dtype, device="cuda", seed=out + inn)
    for blocks in (update.BLOCKS, SMALL):
        prev_buffer, previous = embedded(*shape, dtype=prev_dtype, device="cuda", seed=17)
        param_buffer, param = embedded(*shape, dtype=param_dtype, device="cuda", seed=18)
        prev_before, param_before = prev_buffer.clone(), param_buffer.clone()
        wanted, wanted_param = expected(g_inv, v, a_inv, -0.5, previous, 0.9, param, 0.01, lr=0.1)
        delta = fused_update(g_inv, v, a_inv, scale=-0.5, previous=previous, momentum=0.9, param=param,
                             weight_decay=0.01, lr=0.1, blocks=blocks, backend="triton")
        assert delta is previous and delta.is_cuda
        assert_near(delta, wanted, rel=5e-5, rounding=2 * UNIT[prev_dtype])
        assert_near(param, wanted_param, rel=5e-5, rounding=2 * UNIT[param_dtype])
        assert torch.equal(outside(prev_buffer, out, inn), outside(prev_before, out, inn))
        assert torch.equal(outside(param_buffer, out, inn), outside(param_before, out, inn))
        plain, _ = expected(g_inv, v, a_inv, 2.0)
        assert_near(fused_update(g_inv, v, a_inv, scale=2.0, blocks=blocks, backend="triton"), plain, rel=5e-5)


@requires_cuda
def test_compiled_float64_on_cuda():
    """float64 operands to float64 accuracy: also proves that the coefficients (0.1, 0.3: not float32 values)
    reach the compiled kernel as float64 (the interpreter passes Python floats and cannot show it)."""
    g_inv, v, a_inv = (t.double() for t in operands(3, 200, 301, device="cuda", seed=19))
    _, previous = embedded(3, 200, 301, dtype=F64, device="cuda", seed=20)
    _, param = embedded(3, 200, 301, dtype=F64, device="cuda", seed=21)
    wanted, wanted_param = expected(g_inv, v, a_inv, -0.1, previous, 0.3, param, 0.1, lr=0.3)
    delta = fused_update(g_inv, v, a_inv, scale=-0.1, previous=previous, momentum=0.3, param=param,
                         weight_decay=0.1, lr=0.3, backend="triton")
    assert delta is previous and delta.dtype == F64
    assert_near(delta, wanted, rel=1e-12)
    assert_near(param, wanted_param, rel=1e-12)
