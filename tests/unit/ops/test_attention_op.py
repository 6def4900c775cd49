"""lxt_ext.attention.attention_lrp against independent oracles.

Oracles: (1) the AttnLRP / CP-LRP equations written out densely below in float64; (2) torch's
scaled_dot_product_attention with autograd (exact gradient, then scaled by 1/4, 1/4, 1/2);
(3) eager softmax attention (HF's eager path) for masks of torch.finfo.min. Both backends (PyTorch's
fused kernels, ``backend='aten'``, and lxt_ext's own, ``backend='lxt_ext'``) are held to each oracle
and to each other.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lxt_ext import ops as _ops
from lxt_ext.attention import attention_lrp
from lxt_ext.ops import fused_attention

BACKENDS = ('aten', 'lxt_ext')


def dense_lrp(q, k, v, grad, mask=None, is_causal=False, scale=None, mode='attnlrp'):
    """Output and (dQ, dK, dV) of AttnLRP / CP-LRP with every matrix materialised, in float64."""
    q, k, v, grad = (t.double() for t in (q, k, v, grad))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * q @ k.transpose(-1, -2)
    nq, nk = s.shape[-2:]
    if mask is not None:
        s = s + (torch.where(mask, 0.0, -math.inf) if mask.dtype == torch.bool else mask.double())
    if is_causal:
        s = s.masked_fill(~torch.ones(nq, nk, dtype=torch.bool).tril(), -math.inf)
    seen = (s > -math.inf).any(-1, keepdim=True)
    p = torch.where(seen, torch.softmax(s, -1), 0.0)
    out = p @ v
    if mode == 'cp':
        dv = p.transpose(-1, -2) @ grad
        dq = dk = None
    else:
        dv = 0.5 * p.transpose(-1, -2) @ grad
        dp = 0.5 * grad @ v.transpose(-1, -2)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))
        dq = 0.5 * scale * ds @ k
        dk = 0.5 * scale * ds.transpose(-1, -2) @ q
        dk = dk.unflatten(1, (-1, group)).sum(2)
    dv = dv.unflatten(1, (-1, group)).sum(2)
    return out, dq, dk, dv


def sdpa_scaled(q, k, v, grad, mask=None, is_causal=False, scale=None):
    """torch SDPA's output and exact gradient, scaled the AttnLRP way (1/4, 1/4, 1/2)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                         attn_mask=mask, is_causal=is_causal, scale=scale)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad.double())
    return out, dq / 4, dk / 4, dv / 2


def lxt(q, k, v, grad, mask=None, **kwargs):
    """attention_lrp's output and gradients (None where the mode gives none)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = attention_lrp(q, k, v, mask, **kwargs)
    out.backward(grad)
    return out, q.grad, k.grad, v.grad


def assert_close(actual, expected, rtol, atol=0.0):
    """``max|actual - expected| <= rtol * max|expected| + atol`` (and finite, same shape)."""
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    ref = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * ref + atol and (err == 0 or ref > 0 or atol > 0), f'max error {err:.3g} vs max |expected| {ref:.3g}'


def inputs(b=2, hq=4, hkv=2, nq=9, nk=11, d=16, dtype=torch.float32, seed=0, device='cpu'):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, nk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, nk, d, generator=gen, dtype=torch.float64)
    g = torch.randn(b, hq, nq, d, generator=gen, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v, g))


def masks(kind, b, hq, nq, nk, dtype=torch.float32, seed=1):
    """(mask, is_causal) of each kind the op must take."""
    gen = torch.Generator().manual_seed(seed)
    if kind == 'none':
        return None, False
    if kind == 'causal':
        return None, True
    if kind == 'float':
        return torch.randn(b, 1, nq, nk, generator=gen).to(dtype), False
    if kind == 'bool':
        m = torch.rand(b, hq, nq, nk, generator=gen) > 0.3
        m[..., 0] = True  # every row sees a key: SDPA's and the dense oracle's conventions agree
        return m, False
    if kind == 'key_padding':
        m = torch.ones(b, 1, 1, nk, dtype=torch.bool)
        m[0, ..., nk // 2:] = False
        return m, False
    if kind == 'fully_masked_rows':
        m = torch.rand(nq, nk, generator=gen) > 0.5
        m[0] = False
        m[-1] = False
        m[1:-1, 0] = True
        return m, False
    raise ValueError(kind)


MASK_KINDS = ('none', 'causal', 'float', 'bool', 'key_padding', 'fully_masked_rows')


@pytest.mark.parametrize('kind', MASK_KINDS)
@pytest.mark.parametrize('shape', [(2, 4, 2, 9, 11, 16), (1, 3, 3, 13, 6, 8), (2, 2, 1, 1, 17, 4)],
                         ids=['gqa', 'nq>nk', 'mqa-one-query'])
@pytest.mark.parametrize('backend', BACKENDS)
def test_attnlrp_matches_dense_equations_and_sdpa(kind, shape, backend):
    b, hq, hkv, nq, nk, d = shape
    q, k, v, g = inputs(b, hq, hkv, nq, nk, d)
    mask, causal = masks(kind, b, hq, nq, nk)
    out, dq, dk, dv = lxt(q, k, v, g, mask, is_causal=causal, backend=backend)
    expected = dense_lrp(q, k, v, g, mask, causal)
    # atol: with a single visible key dQ and dK are exactly 0, which float32 meets up to rounding noise
    for a, e in zip((out, dq, dk, dv), expected):
        assert a.dtype == torch.float32
        assert_close(a, e, 1e-5, atol=1e-7)
    for a, e in zip((out, dq, dk, dv), sdpa_scaled(q, k, v, g, mask, causal)):
        assert_close(a, e, 1e-5, atol=1e-7)


@pytest.mark.parametrize('kind', MASK_KINDS)
@pytest.mark.parametrize('backend', BACKENDS + ('auto',))  # auto: ATen's forward, the own dV-only backward
def test_cp_lrp_matches_dense_equations(kind, backend):
    q, k, v, g = inputs()
    mask, causal = masks(kind, 2, 4, 9, 11)
    out, dq, dk, dv = lxt(q, k, v, g, mask, is_causal=causal, mode='cp', backend=backend)
    e_out, _, _, e_dv = dense_lrp(q, k, v, g, mask, causal, mode='cp')
    assert dq is None and dk is None
    assert_close(out, e_out, 1e-5)
    assert_close(dv, e_dv, 1e-5)


@pytest.mark.parametrize('backend', BACKENDS)
def test_fully_masked_rows_give_zero_output_and_gradients(backend):
    q, k, v, g = inputs()
    for mask in (torch.zeros(9, 11, dtype=torch.bool), torch.full((9, 11), -math.inf)):
        mask = mask.clone()
        mask[3:, :] = True if mask.dtype == torch.bool else 0.0
        out, dq, dk, dv = lxt(q, k, v, g, mask, backend=backend)
        assert torch.isfinite(out).all() and torch.isfinite(dq).all()
        assert (out[..., :3, :] == 0).all() and (dq[..., :3, :] == 0).all()
        e_out, e_dq, e_dk, e_dv = dense_lrp(q, k, v, g, mask)
        for a, e in zip((out, dq, dk, dv), (e_out, e_dq, e_dk, e_dv)):
            assert_close(a, e, 1e-5)
    # No key at all: every row is fully masked (the own kernels serve empty inputs on every backend).
    q, k, v, g = inputs(nk=0)
    out, dq, dk, dv = lxt(q, k, v, g, backend=backend)
    assert (out == 0).all() and (dq == 0).all() and dk.shape == k.shape


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('backend', BACKENDS + ('auto',))
def test_finfo_min_mask_behaves_like_softmax(dtype, backend):
    """HF eager masks with torch.finfo(dtype).min: a row whose keys all carry it is uniform (on the ATen
    path its log-sum-exp rounds to the mask value, and the backward recovers the row from the mask)."""
    q, k, v, g = inputs(dtype=dtype)
    lowest = torch.finfo(dtype).min
    mask = torch.zeros(2, 1, 9, 11, dtype=dtype)
    mask[0, 0, 2, :] = lowest                 # every key hidden the finite way: uniform attention
    mask[0, 0, 4, 3:] = lowest                # the same over the keys 3.. (the rest hidden by -inf)
    mask[0, 0, 4, :3] = -math.inf
    mask[1, 0, :, 7:] = lowest                # key padding
    out, dq, dk, dv = lxt(q, k, v, g, mask, backend=backend)
    group = 2
    qe, ke, ve = (t.detach().clone().requires_grad_() for t in (q, k, v))
    scores = qe @ ke.repeat_interleave(group, 1).transpose(-1, -2) / math.sqrt(16) + mask
    eager = torch.softmax(scores, -1) @ ve.repeat_interleave(group, 1)
    e_dq, e_dk, e_dv = torch.autograd.grad(eager, (qe, ke, ve), g)
    assert_close(out, eager, 1e-5)
    assert_close(out[0, :, 2], v[0].repeat_interleave(group, 0).mean(1), 1e-5)
    assert_close(out[0, :, 4], v[0, :, 3:].repeat_interleave(group, 0).mean(1), 1e-5)
    for a, e in zip((dq, dk, dv), (e_dq / 4, e_dk / 4, e_dv / 2)):
        assert_close(a, e, 1e-5)
    cp_dv = lxt(q, k, v, g, mask, mode='cp', backend=backend)[3]  # CP-LRP: the exact dV
    assert_close(cp_dv, e_dv, 1e-5)


@pytest.mark.parametrize('backend', BACKENDS)
def test_float32_mask_of_a_bfloat16_query(backend):
    """finfo(float32).min would round to -inf in bfloat16: both paths read the mask as float32, so the row
    whose keys all carry it stays uniform instead of becoming empty."""
    q, k, v, g = inputs(b=1, hq=2, hkv=2, nq=5, nk=6, d=16, dtype=torch.bfloat16)
    mask = torch.zeros(1, 1, 5, 6)
    mask[..., 2, :] = torch.finfo(torch.float32).min
    out = attention_lrp(q, k, v, mask, backend=backend)
    assert_close(out[0, :, 2], v[0].double().mean(1), 3e-2)


@pytest.mark.parametrize('backend', BACKENDS)
def test_scale_and_bool_mask_broadcast_from_2d(backend):
    q, k, v, g = inputs()
    mask = torch.rand(9, 11, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[:, 0] = True
    res = lxt(q, k, v, g, mask, scale=0.37, backend=backend)
    for a, e in zip(res, dense_lrp(q, k, v, g, mask, scale=0.37)):
        assert_close(a, e, 1e-5)


@pytest.mark.parametrize('backend', BACKENDS)
def test_causal_with_mask_combined(backend):
    q, k, v, g = inputs(nq=11, nk=11)
    mask = torch.randn(2, 4, 11, 11)
    res = lxt(q, k, v, g, mask, is_causal=True, backend=backend)
    for a, e in zip(res, dense_lrp(q, k, v, g, mask, True)):
        assert_close(a, e, 1e-5)


@pytest.mark.parametrize('backend', BACKENDS)
def test_non_contiguous_inputs(backend):
    """HF layout: (B, N, H, D) projections viewed as (B, H, N, D); an expanded gradient too."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 9, 4, 16, generator=gen).transpose(1, 2)
    k = torch.randn(2, 11, 2, 16, generator=gen).transpose(1, 2)
    v = torch.randn(2, 16, 11, 2, generator=gen).permute(0, 3, 2, 1)  # head dim not unit-stride
    g = torch.randn(1, 4, 9, 1, generator=gen).expand(2, 4, 9, 16)
    mask = torch.randn(2, 1, 11, 9, generator=gen).transpose(-1, -2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or mask.is_contiguous())
    res = lxt(q, k, v, g, mask, backend=backend)
    for a, e in zip(res, dense_lrp(q, k, v, g, mask)):
        assert_close(a, e, 1e-5)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('kind', ['none', 'causal', 'float', 'key_padding'])
@pytest.mark.parametrize('backend', BACKENDS)
def test_low_precision(dtype, kind, backend):
    q, k, v, g = inputs(nq=40, nk=40, d=32, dtype=dtype)
    mask, causal = masks(kind, 2, 4, 40, 40, dtype=dtype)
    res = lxt(q, k, v, g, mask, is_causal=causal, backend=backend)
    for a, e in zip(res, dense_lrp(q, k, v, g, mask, causal)):
        assert a.dtype == dtype
        assert_close(a, e, 3e-2)


@pytest.mark.parametrize('backend', BACKENDS)
def test_float64_is_exact(backend):
    q, k, v, g = inputs(dtype=torch.float64)
    mask, _ = masks('float', 2, 4, 9, 11, dtype=torch.float64)
    for mode in ('attnlrp', 'cp'):
        res = lxt(q, k, v, g, mask, mode=mode, backend=backend)
        for a, e in zip(res, dense_lrp(q, k, v, g, mask, mode=mode)):
            if e is not None:
                assert a.dtype == torch.float64
                assert_close(a, e, 1e-12)


@pytest.mark.parametrize('kind', ['none', 'causal', 'bool', 'float', 'fully_masked_rows'])
@pytest.mark.parametrize('backend', BACKENDS)
def test_many_tiles(kind, backend):
    """More rows and keys than one CPU tile holds: rows split over tiles, keys over backward chunks."""
    q, k, v, g = inputs(b=1, hq=2, hkv=1, nq=600, nk=1100, d=8)
    mask, causal = masks(kind, 1, 2, 600, 1100)
    res = lxt(q, k, v, g, mask, is_causal=causal, backend=backend)
    for a, e in zip(res, dense_lrp(q, k, v, g, mask, causal)):
        assert_close(a, e, 2e-5)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), hkv=st.integers(1, 3), group=st.integers(1, 3), nq=st.integers(1, 40),
       nk=st.integers(1, 40), d=st.integers(1, 24), kind=st.sampled_from(MASK_KINDS),
       mode=st.sampled_from(['attnlrp', 'cp']), scale=st.one_of(st.none(), st.floats(0.01, 2.0)),
       seed=st.integers(0, 2 ** 16), backend=st.sampled_from(BACKENDS))
def test_hypothesis_shapes(b, hkv, group, nq, nk, d, kind, mode, scale, seed, backend):
    hq = hkv * group
    q, k, v, g = inputs(b, hq, hkv, nq, nk, d, seed=seed)
    mask, causal = masks(kind, b, hq, nq, nk, seed=seed)
    res = lxt(q, k, v, g, mask, is_causal=causal, scale=scale, mode=mode, backend=backend)
    for a, e in zip(res, dense_lrp(q, k, v, g, mask, causal, scale, mode)):
        if e is None:
            assert a is None
        else:
            # dQ and dK are exactly 0 with a single visible key; float32 leaves rounding noise there,
            # of the size of the float32 dot products over d terms it cancels.
            assert_close(a, e, 2e-5, atol=1e-6 * d * max(1.0, scale or 1.0))


def test_clear_errors():
    q, k, v, g = inputs()
    with pytest.raises(RuntimeError, match='attention_forward.*4-D'):
        attention_lrp(q[0], k, v)
    with pytest.raises(RuntimeError, match='attention_forward.*multiple of the 3 key/value heads'):
        attention_lrp(q, torch.randn(2, 3, 11, 16), torch.randn(2, 3, 11, 16))
    with pytest.raises(RuntimeError, match='attention_forward.*share one dtype'):
        attention_lrp(q, k.double(), v)
    with pytest.raises(RuntimeError, match='attention_forward.*head dimension'):
        attention_lrp(q, k[..., :8], v[..., :8])
    with pytest.raises(RuntimeError, match='attention_forward.*batch sizes'):
        attention_lrp(q, k[:1], v[:1])
    with pytest.raises(RuntimeError, match='attention_forward.*same heads and tokens'):
        attention_lrp(q, k, v[:, :, :5])
    with pytest.raises(RuntimeError, match='attention_forward.*not broadcastable'):
        attention_lrp(q, k, v, torch.zeros(2, 3, 9, 11))
    with pytest.raises(RuntimeError, match='attention_forward.*not broadcastable'):
        attention_lrp(q, k, v, torch.zeros(1, 2, 1, 9, 11))
    with pytest.raises(RuntimeError, match='attention_forward.*attn_mask must be bool'):
        attention_lrp(q, k, v, torch.zeros(9, 11, dtype=torch.int32))
    with pytest.raises(RuntimeError, match='attention_forward.*floating query'):
        attention_lrp(q.int(), k.int(), v.int())
    with pytest.raises(ValueError, match="mode must be one of"):
        attention_lrp(q, k, v, mode='uniform')
    with pytest.raises(RuntimeError, match='attention_forward.*one device'):
        attention_lrp(q, k.to('meta'), v)
    out, stats = _ops.lib.attention_forward(q, k, v, None, 0.25, False)
    with pytest.raises(RuntimeError, match='attention_backward.*mode must be'):
        _ops.lib.attention_backward(g, q, k, v, None, out, stats, 0.25, False, 2)
    with pytest.raises(RuntimeError, match='attention_backward.*stats must be'):
        _ops.lib.attention_backward(g, q, k, v, None, out, stats[..., :1], 0.25, False, 0)


@pytest.mark.skipif(_ops.cuda_built(), reason='this build has the CUDA kernels')
def test_cuda_tensor_on_cpu_only_build_names_the_op_and_rebuild():
    q, k, v, _ = inputs()
    try:
        q, k, v = (t.to('cuda') for t in (q, k, v))
    except (AssertionError, RuntimeError):
        pytest.skip('no CUDA device to place a tensor on')
    with pytest.raises(RuntimeError, match='attention_forward got CUDA tensors.*Rebuild'):
        attention_lrp(q, k, v)


@pytest.mark.parametrize('backend', BACKENDS)
def test_only_linear_size_tensors_are_saved(backend):
    """Backward keeps the inputs, O and one (ATen) or two (own kernels) numbers per query row: nothing of
    size Nq x Nk."""
    b, hq, hkv, n, d = 1, 2, 1, 512, 8
    q, k, v, _ = inputs(b, hq, hkv, n, n, d)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attention_lrp(q, k, v, is_causal=True, backend=backend)
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    own = [t for t in saved if not any(t is x for x in (q, k, v))]
    stats = (b, hq, n) if backend == 'aten' else (b, hq, n, 2)
    assert [tuple(t.shape) for t in own] == [(b, hq, n, d), stats]
    assert all(t.numel() < n * n for t in saved)


_PEAK_SCRIPT = r'''
import math, sys, torch
from lxt_ext.attention import attention_lrp
torch.set_num_threads(1)
method, n = sys.argv[1], int(sys.argv[2])
q, k, v = (torch.randn(1, 1, n, 64, requires_grad=True) for _ in range(3))
def kb(field):
    return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1])
before = kb('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')
if method == 'lxt_ext':
    out = attention_lrp(q, k, v)
else:
    out = torch.softmax(q @ k.transpose(-1, -2) / 8, -1) @ v
out.sum().backward()
print((kb('VmHWM') - before) / 1024)
'''


def _peak_mb(method, n):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='0')
    out = subprocess.run([sys.executable, '-c', _PEAK_SCRIPT, method, str(n)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists('/proc/self/clear_refs'), reason='needs Linux /proc to reset VmHWM')
def test_peak_memory_grows_linearly():
    """Measured peak of forward+backward: doubling N from 2k to 4k must not quadruple it (one
    4k x 4k float matrix alone is 64 MB; the eager attention of the same size is the control)."""
    small, large = _peak_mb('lxt_ext', 2048), _peak_mb('lxt_ext', 4096)
    eager_large = _peak_mb('eager', 4096)
    assert eager_large > 64, f'the control measured only {eager_large:.1f} MB'
    # half of one 4k x 4k float32 matrix: no N x N tensor can fit, while the op's linear memory
    # (inputs, gradients, O, per-thread tiles; 17-25 MB measured) has room to vary with the allocator
    assert large < 32, f'lxt_ext used {large:.1f} MB at N=4096'
    assert large < 2.5 * max(small, 1.0), f'{small:.1f} MB at N=2048 but {large:.1f} MB at N=4096'


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not _ops.cuda_built(),
                                reason='needs a GPU and the CUDA kernels')


def on_cuda(*tensors):
    return tuple(None if t is None else t.cuda() for t in tensors)


@needs_cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('kind', MASK_KINDS)
@pytest.mark.parametrize('d', [16, 64, 128, 200])
@pytest.mark.parametrize('backend', ['lxt_ext', 'auto'])
def test_cuda_matches_cpu(dtype, kind, d, backend):
    """Both CUDA paths (own kernels; the default rule: flash, memory-efficient or cuDNN where torch picks
    one) against the CPU's own kernels."""
    q, k, v, g = inputs(b=2, hq=4, hkv=2, nq=70, nk=45, d=d, dtype=dtype)
    mask, causal = masks(kind, 2, 4, 70, 45, dtype=dtype)
    rtol = 1e-5 if dtype in (torch.float32, torch.float64) else 3e-2
    for mode in ('attnlrp', 'cp'):
        cpu = lxt(q, k, v, g, mask, is_causal=causal, mode=mode, backend='lxt_ext')
        gpu = lxt(*on_cuda(q, k, v, g), *on_cuda(mask), is_causal=causal, mode=mode, backend=backend)
        for a, e in zip(gpu, cpu):
            if e is None:
                assert a is None
            else:
                assert a.is_cuda and a.dtype == dtype
                assert_close(a.cpu(), e, rtol)


@needs_cuda
@pytest.mark.parametrize('backend', ['lxt_ext', 'aten'])
def test_cuda_non_contiguous_finfo_min_and_empty_rows(backend):
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 33, 4, 64, generator=gen).transpose(1, 2)
    k = torch.randn(2, 40, 2, 64, generator=gen).transpose(1, 2)
    v = torch.randn(2, 40, 2, 64, generator=gen).transpose(1, 2)
    g = torch.randn(2, 4, 33, 64, generator=gen)
    mask = torch.zeros(2, 1, 33, 40)
    mask[0, 0, 5] = torch.finfo(torch.float32).min
    mask[1, 0, 6] = -math.inf
    cpu = lxt(q, k, v, g, mask, backend='lxt_ext')
    gpu = lxt(*on_cuda(q, k, v, g, mask), backend=backend)
    for a, e in zip(gpu, cpu):
        assert_close(a.cpu(), e, 1e-5)
    assert (gpu[0][1, :, 6] == 0).all()


# What a first GPU run usually finds (issue 11, item 3): each case against the CPU's own kernels or the
# dense equations.

@needs_cuda
@pytest.mark.parametrize('shape', [(0, 4, 2, 5, 7, 16), (2, 4, 2, 0, 7, 16), (2, 4, 2, 5, 0, 16)],
                         ids=['no-batch', 'no-query', 'no-key'])
@pytest.mark.parametrize('backend', ['lxt_ext', 'auto'])
def test_cuda_zero_sized(shape, backend):
    q, k, v, g = inputs(*shape)
    for mode in ('attnlrp', 'cp'):
        gpu = lxt(*on_cuda(q, k, v, g), mode=mode, backend=backend)
        for a, e in zip(gpu, dense_lrp(q, k, v, g, mode=mode)):
            if e is not None:
                assert_close(a.cpu(), e, 1e-5)


@needs_cuda
@pytest.mark.parametrize('d', [1, 8, 96, 256])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_head_dims_and_shared_memory(d, dtype):
    """Every head-dim template of the own kernels, float64 included (the largest shared-memory need)."""
    q, k, v, g = inputs(b=1, hq=2, hkv=1, nq=65, nk=97, d=d, dtype=dtype)
    rtol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    for mode in ('attnlrp', 'cp'):
        gpu = lxt(*on_cuda(q, k, v, g), is_causal=True, mode=mode, backend='lxt_ext')
        for a, e in zip(gpu, dense_lrp(q, k, v, g, is_causal=True, mode=mode)):
            if e is not None:
                assert_close(a.cpu(), e, rtol, atol=1e-6)


@needs_cuda
def test_cuda_head_dim_beyond_the_own_kernels_is_a_clear_error():
    q, k, v, g = on_cuda(*inputs(b=1, hq=1, hkv=1, nq=4, nk=4, d=264))
    with pytest.raises(RuntimeError, match='head_dim <= 256'):
        attention_lrp(q, k, v, backend='lxt_ext')


@needs_cuda
def test_cuda_grid_limits():
    """Batch and heads map to grid dimensions z and y (at most 65535 each): the largest batch runs, one more
    is a clear error on the own kernels."""
    q, k, v, g = inputs(b=65535, hq=1, hkv=1, nq=2, nk=3, d=8)
    gpu = lxt(*on_cuda(q, k, v, g), backend='lxt_ext')
    for a, e in zip(gpu, dense_lrp(q, k, v, g)):
        assert_close(a.cpu(), e, 1e-5)
    q, k, v, _ = inputs(b=65536, hq=1, hkv=1, nq=2, nk=3, d=8)
    with pytest.raises(RuntimeError, match='at most 65535 batches'):
        attention_lrp(*on_cuda(q, k, v), backend='lxt_ext')


@needs_cuda
@pytest.mark.parametrize('backend', ['lxt_ext', 'aten'])
def test_cuda_runs_on_the_current_stream(backend):
    """Work queued on a side stream, inputs made there: the result matches without a device-wide sync in
    between (a kernel on the default stream would race with the inputs' copies)."""
    q, k, v, g = inputs(b=2, hq=4, hkv=2, nq=300, nk=300, d=64)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gpu = lxt(*on_cuda(q, k, v, g), is_causal=True, backend=backend)
        gpu = [t.cpu() for t in gpu]  # copies on the same stream
    for a, e in zip(gpu, dense_lrp(q, k, v, g, is_causal=True)):
        assert_close(a, e, 1e-5)


@needs_cuda
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('backend', ['lxt_ext', 'aten'])
def test_cuda_half_types_accumulate_in_float32(dtype, backend):
    """4096 keys per row: with half-precision accumulation the row sums and dot products would drift far
    beyond 3e-2; float32 accumulation keeps them to the rounding of the inputs and outputs."""
    q, k, v, g = inputs(b=1, hq=2, hkv=1, nq=64, nk=4096, d=64, dtype=dtype)
    for a, e in zip(lxt(*on_cuda(q, k, v, g), backend=backend), dense_lrp(q, k, v, g)):
        assert a.dtype == dtype
        assert_close(a.cpu(), e, 3e-2)


@needs_cuda
@pytest.mark.parametrize('backend', ['lxt_ext', 'aten'])
def test_cuda_float32_mask_of_a_bfloat16_query(backend):
    """finfo(float32).min would round to -inf in bfloat16: the mask is read as float32, the row stays uniform."""
    q, k, v, g = inputs(b=1, hq=2, hkv=2, nq=5, nk=6, d=16, dtype=torch.bfloat16)
    mask = torch.zeros(1, 1, 5, 6)
    mask[..., 2, :] = torch.finfo(torch.float32).min
    out = attention_lrp(*on_cuda(q, k, v, mask), backend=backend)
    assert_close(out[0, :, 2].cpu(), v[0].double().mean(1), 3e-2)
    cpu = attention_lrp(q, k, v, mask, backend='lxt_ext')
    assert_close(out.cpu(), cpu, 3e-2)


# --- the two backends ----------------------------------------------------------------------------------

@pytest.mark.parametrize('dtype, rtol', [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('kind', MASK_KINDS)
@pytest.mark.parametrize('mode', ['attnlrp', 'cp'])
@pytest.mark.parametrize('shape', [(2, 4, 2, 33, 33, 16), (1, 6, 2, 20, 31, 32), (2, 3, 3, 17, 9, 8)],
                         ids=['gqa-batched', 'gqa-one-sequence', 'mha'])
def test_backends_agree(dtype, rtol, kind, mode, shape):
    """ATen's fused kernels and the own kernels give the same output and relevance gradients, each close
    to the dense equations."""
    b, hq, hkv, nq, nk, d = shape
    q, k, v, g = inputs(b, hq, hkv, nq, nk, d, dtype=dtype)
    mask, causal = masks(kind, b, hq, nq, nk, dtype=dtype)
    # auto: for CP-LRP ATen's forward with the own backward
    aten, own, auto = (lxt(q, k, v, g, mask, is_causal=causal, mode=mode, backend=be) for be in BACKENDS + ('auto',))
    for a, o, au, e in zip(aten, own, auto, dense_lrp(q, k, v, g, mask, causal, mode=mode)):
        if e is None:
            assert a is None and o is None and au is None
            continue
        assert a.dtype == o.dtype == au.dtype == dtype
        assert_close(a, o, rtol)
        assert_close(au, o, rtol)
        assert_close(a, e, 2 * rtol if dtype == torch.bfloat16 else rtol)


@pytest.mark.parametrize('kind', MASK_KINDS)
@pytest.mark.parametrize('mode', ['attnlrp', 'cp'])
@pytest.mark.parametrize('grouped', [True, False], ids=['kernel-groups-heads', 'folded'])
def test_grouped_query_attention_with_and_without_folding(kind, mode, grouped, monkeypatch):
    """Grouped-query attention on ATen's CPU kernel, which takes the groups itself where torch's does, and
    folded into stride-0 batch entries (torch releases whose kernel does not): both equal the dense equations."""
    from lxt_ext.ops import fused_attention
    if grouped and not fused_attention._CPU_GROUPS_HEADS:
        pytest.skip("this torch's CPU flash kernel does not take grouped heads")
    monkeypatch.setattr(fused_attention, '_CPU_GROUPS_HEADS', grouped)
    q, k, v, g = inputs(2, 4, 2, 33, 33, 16)
    mask, causal = masks(kind, 2, 4, 33, 33)
    result = lxt(q, k, v, g, mask, is_causal=causal, mode=mode, backend='aten')
    for a, e in zip(result, dense_lrp(q, k, v, g, mask, causal, mode=mode)):
        assert (a is None) == (e is None)
        if e is not None:
            assert_close(a, e, 1e-5)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('backend', BACKENDS)
def test_bert_padding_mask(dtype, backend):
    """BERT's eager mask: (B, 1, 1, Nk) with torch.finfo.min on the padded keys, every query row sees a key;
    the padded query rows (whose output nothing reads) included."""
    q, k, v, g = inputs(b=3, hq=4, hkv=4, nq=24, nk=24, d=16, dtype=dtype)
    lengths = torch.tensor([24, 17, 5])
    mask = torch.zeros(3, 1, 1, 24, dtype=dtype)
    mask[torch.arange(24)[None, None, None] >= lengths[:, None, None, None]] = torch.finfo(dtype).min
    res = lxt(q, k, v, g, mask, backend=backend)
    qe, ke, ve = (t.detach().double().requires_grad_() for t in (q, k, v))
    eager = torch.softmax(qe @ ke.transpose(-1, -2) / 4 + mask.double(), -1) @ ve
    expected = (eager, *(t * s for t, s in zip(torch.autograd.grad(eager, (qe, ke, ve), g.double()), (.25, .25, .5))))
    for a, e in zip(res, expected):
        assert_close(a, e, 1e-5 if dtype == torch.float32 else 3e-2)


def test_rule_depends_on_kinds_and_shapes_only():
    """The documented rule (lxt_ext.ops.fused_attention): ATen for AttnLRP in float32/bfloat16/float16, ATen's
    forward and the own dV-only backward for CP-LRP on the CPU, the own kernels for float64, empty inputs
    and large masks that would need a copy."""
    q, k, v, _ = inputs(b=1, hq=4, hkv=2, nq=64, nk=64, d=16)

    def plan(q=q, k=k, v=v, mask=None, cp=False, backend='auto', causal=False):
        return fused_attention.plan(q, k, v, mask, 0.25, causal, cp, backend)

    assert plan() == plan(causal=True) == plan(q=q.bfloat16(), k=k.bfloat16(), v=v.bfloat16()) == 'aten'
    assert plan(cp=True) == 'aten_forward' and plan(cp=True, backend='aten') == 'aten'
    assert plan(q=q.double(), k=k.double(), v=v.double()) == 'own'
    assert plan(q=q.double(), k=k.double(), v=v.double(), backend='aten') == 'aten'
    assert plan(backend='lxt_ext') == plan(cp=True, backend='lxt_ext') == 'own'
    assert plan(k=k[:, :, :0], v=v[:, :, :0], backend='aten') == 'own'
    assert plan(mask=torch.zeros(1, 1, 64, 64)) == 'aten'                   # additive, the query's dtype
    assert plan(mask=torch.ones(1, 1, 1, 64, dtype=torch.bool)) == 'aten'   # small bool mask: a small copy
    big = torch.ones(1, 4, 64, 64, dtype=torch.bool)                         # 16k elements > q, k, v's 8k
    assert plan(mask=big) == 'own' and plan(mask=big, backend='aten') == 'aten'
    assert plan(mask=torch.zeros(3, 64, 64), backend='aten') == 'own'       # malformed: the own op names it


def test_backend_is_forced_by_argument_and_environment(monkeypatch):
    q, k, v, _ = inputs()
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def stats_shape(**kwargs):
        return tuple(attention_lrp(q, k, v, **kwargs).grad_fn.saved_tensors[-1].shape)

    assert stats_shape() == stats_shape(mode='cp') == (2, 4, 9)  # auto: ATen's log-sum-exp
    assert stats_shape(backend='lxt_ext') == (2, 4, 9, 2)        # own kernels' two numbers per row
    monkeypatch.setenv(fused_attention.ENVIRONMENT, 'lxt_ext')
    assert stats_shape() == (2, 4, 9, 2)
    assert stats_shape(backend='aten') == (2, 4, 9)
    monkeypatch.setenv(fused_attention.ENVIRONMENT, 'flash')
    with pytest.raises(ValueError, match=r'\$LXT_EXT_ATTENTION_BACKEND must be one of'):
        attention_lrp(q, k, v)
    with pytest.raises(ValueError, match='backend must be one of'):
        attention_lrp(q, k, v, backend='cudnn')


def test_a_changed_aten_signature_warns_and_is_not_called(monkeypatch):
    name = '_scaled_dot_product_flash_attention_for_cpu'
    expected, results = fused_attention._SIGNATURES[name]
    monkeypatch.setitem(fused_attention._SIGNATURES, name, (expected + ('window',), results))
    with pytest.warns(RuntimeWarning, match=f'not the signature lxt_ext calls.*{name}'):
        assert not fused_attention._matching(name)


def test_compiled_aten_path_gives_the_eager_gradients():
    """torch.compile traces the rule and the ATen calls (shapes and kinds only: one graph, no break)."""
    torch._dynamo.reset()
    q, k, v, g = inputs(b=1, hq=4, hkv=2, nq=16, nk=16, d=8)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 12:] = torch.finfo(torch.float32).min

    def f(q, k, v):
        return attention_lrp(q, k, v, mask, backend='aten')

    eager = lxt(q, k, v, g, mask, backend='aten')
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    compiled_f = torch.compile(f, backend=backend)
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    out = compiled_f(q2, k2, v2)
    out.backward(g)
    assert len(graphs) == 1
    for a, e in zip((out, q2.grad, k2.grad, v2.grad), eager):
        assert_close(a, e, 1e-6)
