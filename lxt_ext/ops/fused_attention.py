"""PyTorch's own fused attention kernels as a backend of ``lxt_ext.attention.attention_lrp``.

AttnLRP's backward is the exact attention gradient with dV scaled by 1/2 and dQ, dK by 1/4, and
CP-LRP's dV is the exact dV, so ATen's fused kernels compute both: on the CPU
``_scaled_dot_product_flash_attention_for_cpu`` and its backward, on CUDA the flash,
memory-efficient and cuDNN kernels behind ``scaled_dot_product_attention`` (whichever
``aten::_fused_sdp_choice`` picks for the call, i.e. what each accepts by dtype, head dimension,
mask and strides, under torch's ``sdpa_kernel`` settings). The rescaling costs one pass over dO
(``backward``). The kernels take Q, K, V, O and dO at their strides (Hugging Face's (B, N, H, D)
layout seen as (B, H, N, D) too): copying them contiguous cost more than it saved
(docs/benchmarks_transformers.md).

The rule (``plan``) looks at devices, dtypes, shapes and the mask's kind only, never at values
(no device sync; fake tensors and ``torch.compile`` trace it):

- ``backend='lxt_ext'`` (or ``LXT_EXT_ATTENTION_BACKEND=lxt_ext``): always lxt_ext's own kernels;
- ``backend='aten'``: ATen's forward and backward wherever they can take the call (every case but
  empty inputs, float64 on CUDA and what ``_fused_sdp_choice`` refuses there);
- ``backend='auto'`` (default): ATen in float32, bfloat16 and float16, unless a bool mask or one
  of another dtype would have to be copied at more elements than query, key and value hold
  together (the own kernels read such a mask in place, keeping extra memory linear in the
  tokens); float64 stays on the own kernels (exact there). CP-LRP on the CPU takes ATen's forward
  and the own dV-only backward, which is faster than ATen's full backward computing dQ and dK
  too (docs/benchmarks_transformers.md); on CUDA ATen's backward until a GPU measurement says
  otherwise.

``plan`` returns which (``PLANS``).

Grouped-query attention (Hq = G Hkv) runs without copying K and V: the CPU kernel takes the groups
itself where this torch's does (probed on import); elsewhere the G query heads of a group become G
batch entries reading one stride-0 K/V (per batch element when B > 1), and dK, dV sum over them.
(Folded, the CPU kernel reads the query at the stride of Hugging Face's (B, N, H, D) layout, which is
slower: docs/benchmarks_transformers.md.)

Precision: ATen keeps one log-sum-exp per row, lxt_ext's kernels two numbers (row max, log row
sum). With Hugging Face's ``finfo.min`` masks, a row whose every key is masked that way has
max = finfo.min and max + log(sum) rounds back to the max, so ATen's backward would see each of its
n probabilities as 1 instead of 1/n. Its scores are the mask's values there (finfo.min absorbs
``q.k``), so the backward recovers the row from the mask (``row_factor``): its probabilities are
off by one factor per row, and every gradient of the row is linear in them, so dO is scaled by
its inverse. Rows that see no key (all False or -inf) give zeros on both paths.

The private ATen signatures differ between torch releases: they are checked against the ones
called here on import; a mismatch warns once and leaves the own kernels in charge.
"""
import os
import warnings

import torch

from . import ATTNLRP_FACTORS
from .masks import additive_from_attend

BACKENDS = ('auto', 'aten', 'lxt_ext')
ENVIRONMENT = 'LXT_EXT_ATTENTION_BACKEND'

_aten = torch.ops.aten

# The signatures called below (argument names, number of results), as in torch 2.4-2.14.
_SIGNATURES = {
    '_scaled_dot_product_flash_attention_for_cpu': (
        ('query', 'key', 'value', 'dropout_p', 'is_causal', 'attn_mask', 'scale'), 2),
    '_scaled_dot_product_flash_attention_for_cpu_backward': (
        ('grad_out', 'query', 'key', 'value', 'out', 'logsumexp', 'dropout_p', 'is_causal', 'attn_mask', 'scale'), 3),
    '_fused_sdp_choice': (('query', 'key', 'value', 'attn_mask', 'dropout_p', 'is_causal', 'scale', 'enable_gqa'), 1),
    '_scaled_dot_product_flash_attention': (
        ('query', 'key', 'value', 'dropout_p', 'is_causal', 'return_debug_mask', 'scale'), 9),
    '_scaled_dot_product_flash_attention_backward': (
        ('grad_out', 'query', 'key', 'value', 'out', 'logsumexp', 'cum_seq_q', 'cum_seq_k', 'max_q', 'max_k',
         'dropout_p', 'is_causal', 'philox_seed', 'philox_offset', 'scale'), 3),
    '_scaled_dot_product_efficient_attention': (
        ('query', 'key', 'value', 'attn_bias', 'compute_log_sumexp', 'dropout_p', 'is_causal', 'scale'), 4),
    '_scaled_dot_product_efficient_attention_backward': (
        ('grad_out_', 'query', 'key', 'value', 'attn_bias', 'out', 'logsumexp', 'philox_seed', 'philox_offset',
         'dropout_p', 'grad_input_mask', 'is_causal', 'scale'), 4),
    '_scaled_dot_product_cudnn_attention': (
        ('query', 'key', 'value', 'attn_bias', 'compute_log_sumexp', 'dropout_p', 'is_causal', 'return_debug_mask',
         'scale'), 9),
    '_scaled_dot_product_cudnn_attention_backward': (
        ('grad_out', 'query', 'key', 'value', 'out', 'logsumexp', 'philox_seed', 'philox_offset', 'attn_bias',
         'cum_seq_q', 'cum_seq_k', 'max_q', 'max_k', 'dropout_p', 'is_causal', 'scale'), 3),
}


def _matching(name):
    """Whether ``aten::name`` exists with the signature called here; warns when it differs."""
    expected, results = _SIGNATURES[name]
    try:
        schema = getattr(_aten, name).default._schema
    except (AttributeError, RuntimeError):
        schema = None
    if schema is not None and tuple(a.name for a in schema.arguments) == expected and len(schema.returns) == results:
        return True
    warnings.warn(f'lxt_ext: torch {torch.__version__} has {schema or "no aten::" + name}, not the signature '
                  f'lxt_ext calls ({name}({", ".join(expected)}) -> {results} results); attention_lrp uses its own '
                  f'kernels where it would have called it', RuntimeWarning, stacklevel=2)
    return False


_CPU_OK = all(_matching(n) for n in ('_scaled_dot_product_flash_attention_for_cpu',
                                    '_scaled_dot_product_flash_attention_for_cpu_backward'))
# CUDA: checked only where a CUDA build of torch could call them.
_CUDA_KERNELS = {}
if torch.version.cuda is not None and _matching('_fused_sdp_choice'):
    from torch.nn.attention import SDPBackend
    for _backend, _name in ((SDPBackend.FLASH_ATTENTION, '_scaled_dot_product_flash_attention'),
                            (SDPBackend.EFFICIENT_ATTENTION, '_scaled_dot_product_efficient_attention'),
                            (SDPBackend.CUDNN_ATTENTION, '_scaled_dot_product_cudnn_attention')):
        if _matching(_name) and _matching(_name + '_backward'):
            _CUDA_KERNELS[int(_backend)] = _name


def resolve(backend):
    """``backend`` (None: ``$LXT_EXT_ATTENTION_BACKEND``, else 'auto') checked against ``BACKENDS``."""
    if backend is None:
        backend = os.environ.get(ENVIRONMENT) or 'auto'
        where = f'${ENVIRONMENT}'
    else:
        where = 'backend'
    if backend not in BACKENDS:
        raise ValueError(f'attention_lrp: {where} must be one of {BACKENDS}, got {backend!r}')
    return backend


def _mask_copy_elements(attn_mask, query):
    """Elements of the additive copy of ``attn_mask`` that ATen needs (0 when it takes the mask as it is)."""
    if attn_mask is None or attn_mask.dtype in (query.dtype, torch.float32 if query.dtype != torch.float64 else None):
        return 0
    return attn_mask.numel()


def _cuda_choice(query, key, value, attn_mask, scale, is_causal):
    """The ATen kernel (``_CUDA_KERNELS`` key) torch picks for the folded call, or None."""
    q, k, v, mask = _fold(query, key, value, _additive(attn_mask, query), 0)
    choice = int(_aten._fused_sdp_choice(q, k, v, mask, 0.0, is_causal, scale=scale, enable_gqa=False))
    if choice not in _CUDA_KERNELS or (mask is not None and _CUDA_KERNELS[choice].endswith('flash_attention')):
        return None
    return choice


PLANS = ('own', 'aten', 'aten_forward')
"""Which kernels run a call: the own ones for both passes, ATen's for both, or ATen's forward with the own
dV-only backward (CP-LRP: its backward needs the row statistics, which ATen's log-sum-exp gives)."""


def plan(query, key, value, attn_mask, scale, is_causal, mode_cp, backend):
    """The ``PLANS`` entry of this call by the rule of the module docstring; ``backend`` as ``resolve``
    returns it."""
    if backend == 'lxt_ext' or not _well_formed(query, key, value, attn_mask):
        return 'own'
    cpu = query.device.type == 'cpu'
    if not (_CPU_OK if cpu else query.device.type == 'cuda' and _CUDA_KERNELS and query.dtype != torch.float64):
        return 'own'
    if backend == 'auto' and (query.dtype == torch.float64 or _mask_copy_elements(attn_mask, query) >
                              query.numel() + key.numel() + value.numel()):
        return 'own'
    if not cpu and _cuda_choice(query, key, value, attn_mask, scale, is_causal) is None:
        return 'own'
    return 'aten_forward' if backend == 'auto' and mode_cp and cpu else 'aten'


def _well_formed(query, key, value, attn_mask):
    """Inputs the own op would accept, none empty: malformed calls go to the own op, whose checks name the
    cause; empty ones too (ATen's CPU kernel divides by the number of keys)."""
    tensors = (query, key, value)
    if any(t.dim() != 4 or t.dtype != query.dtype or t.device != query.device or t.numel() == 0 for t in tensors):
        return False
    if not query.dtype.is_floating_point or key.shape != value.shape or key.shape[0] != query.shape[0]:
        return False
    if key.shape[1] == 0 or query.shape[1] % key.shape[1] or key.shape[3] != query.shape[3]:
        return False
    if attn_mask is None:
        return True
    if attn_mask.device != query.device or not (attn_mask.dtype == torch.bool or attn_mask.dtype.is_floating_point):
        return False
    target = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    return attn_mask.dim() <= 4 and all(m in (1, t) for m, t in zip(reversed(attn_mask.shape), reversed(target)))


def _additive(attn_mask, query):
    """The mask as ATen takes it: 4-D, additive (False -> -inf), in the query's dtype (float32 kept for half
    types)."""
    if attn_mask is None:
        return None
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if mask.dtype == torch.bool:
        return additive_from_attend(mask, query.dtype)
    if mask.dtype != query.dtype and not (mask.dtype == torch.float32 and query.dtype != torch.float64):
        return mask.to(query.dtype)
    return mask


def _fold(query, key, value, mask, b):
    """Grouped-query attention as plain attention: the G query heads of a group become G batch entries
    reading one stride-0 K/V (batch element ``b``); unchanged when G = 1 or ``b`` is None (the kernel
    groups the heads itself)."""
    group = query.shape[1] // key.shape[1]
    if group == 1 or b is None:
        return query, key, value, mask
    q, k, v = query[b], key[b], value[b]
    q = q.unflatten(0, (key.shape[1], group)).transpose(0, 1)  # (G, Hkv, Nq, D), a view
    k, v = k.expand(group, *k.shape), v.expand(group, *v.shape)
    if mask is not None:
        mask = mask[b if mask.shape[0] > 1 else 0]
        mask = mask.unflatten(0, (key.shape[1], group)).transpose(0, 1) if mask.shape[0] > 1 else mask[None]
    return q, k, v, mask


def _unfold_heads(t):
    """(G, Hkv, ...) of one batch element -> (1, Hq, ...)."""
    return t.transpose(0, 1).flatten(0, 1)[None]


def _cpu_kernel_groups_heads():
    """Whether this torch's CPU flash kernel takes grouped-query attention itself (fewer K/V heads than
    query heads, forward and backward; torch 2.14 does): a property of the release, probed once."""
    try:
        q, kv = torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 1, 8)
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, kv, kv, 0.0, False)
        grads = _aten._scaled_dot_product_flash_attention_for_cpu_backward(out, q, kv, kv, out, lse, 0.0, False)
        return [tuple(t.shape) for t in grads] == [tuple(q.shape), tuple(kv.shape), tuple(kv.shape)]
    except (RuntimeError, TypeError):
        return False


_CPU_GROUPS_HEADS = _cpu_kernel_groups_heads()


def _per_batch(query, key, fn):
    """``fn(b)`` for each batch element when the heads are grouped and the kernel does not take groups
    itself (a list), else ``[fn(None)]``."""
    if query.shape[1] == key.shape[1] or (query.device.type == 'cpu' and _CPU_GROUPS_HEADS):
        return [fn(None)]
    return [fn(b) for b in range(query.shape[0])]


def forward(query, key, value, attn_mask, scale, is_causal):
    """``(out, lse, aux)``: ATen's output and log-sum-exp per row, both (B, Hq, ...)-shaped, and what the
    CUDA kernels' backward takes from their forward (per call; None on the CPU)."""
    mask = _additive(attn_mask, query)
    cuda = query.device.type == 'cuda'
    choice = _cuda_choice(query, key, value, attn_mask, scale, is_causal) if cuda else None

    def one(b):
        q, k, v, m = _fold(query, key, value, mask, b)
        if cuda:
            out, lse, aux = _cuda_forward(choice, q, k, v, m, scale, is_causal)
        else:
            out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, attn_mask=m,
                                                                           scale=scale)
            aux = None
        if b is None:
            return out, lse, aux
        return _unfold_heads(out), _unfold_heads(lse), aux

    parts = _per_batch(query, key, one)
    aux = [p[2] for p in parts] if cuda else None
    if len(parts) == 1:
        return parts[0][0], parts[0][1], aux
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), aux


def _lost_rows(lse, attn_mask, query_shape, nk, is_causal):
    """``(lse, lost, top, log_sum)``, (B, Hq, Nq)-broadcastable: ATen's log-sum-exp per row (in the
    accumulation dtype), which rows lost the log row sum to a huge finite mask value, and those rows'
    max and log sum, or None without a float mask (whose rows never lose it).

    Where that happens the scores are the mask's values (the mask absorbs ``q.k``), so the row's max
    and log sum come from the mask alone, in chunks of rows (at most 16 MB of temporaries)."""
    if attn_mask is None or attn_mask.dtype == torch.bool:
        return None
    B, H, nq, _ = query_shape
    acc = torch.promote_types(lse.dtype, torch.float32)
    lse = lse.flatten(2)[..., :nq].to(acc)  # CUDA kernels may pad the rows or add a trailing 1
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    per_row = mask.shape[2] > 1 or is_causal
    step = max(1, (1 << 22) // max(nk * mask.shape[0] * mask.shape[1], 1)) if per_row else nq
    tops, log_sums = [], []
    for i0 in range(0, nq if per_row else 1, step):
        i1 = min(nq, i0 + step)
        t = mask[:, :, i0:i1] if mask.shape[2] > 1 else mask
        t = t.to(acc).expand(-1, -1, i1 - i0 if per_row else 1, nk)
        if is_causal:
            t = t.masked_fill(torch.ones(i1 - i0, nk, dtype=torch.bool, device=t.device).triu_(i0 + 1), -float('inf'))
        top = t.amax(-1, keepdim=True)
        tops.append(top[..., 0])
        log_sums.append((t - top.masked_fill(top == -float('inf'), 0)).exp_().sum(-1).log_())
    top, log_sum = torch.cat(tops, 2), torch.cat(log_sums, 2).nan_to_num_(0.0, 0.0, 0.0)
    return lse, (lse == top) & (top + log_sum == top) & (log_sum > 0), top, log_sum


def row_factor(lse, attn_mask, query_shape, nk, is_causal):
    """(B, Hq, Nq) factors ``exp(lse - (max + log sum))`` by which ATen's backward, rebuilding P as
    ``exp(S - lse)``, overestimates a row: ``l`` where the row lost ``log l`` (``_lost_rows``), else 1;
    None where no row can."""
    rows = _lost_rows(lse, attn_mask, query_shape, nk, is_causal)
    if rows is None:
        return None
    _, lost, _, log_sum = rows
    return torch.where(lost, log_sum.exp(), 1.0)


def own_statistics(lse, attn_mask, query_shape, nk, is_causal):
    """The (B, Hq, Nq, 2) statistics (row max, log row sum) of lxt_ext's own backward from ATen's
    log-sum-exp: (lse, 0), and (max, log sum) where the row lost ``log l``."""
    B, H, nq, _ = query_shape
    rows = _lost_rows(lse, attn_mask, query_shape, nk, is_causal)
    if rows is None:
        lse = lse.flatten(2)[..., :nq].to(torch.promote_types(lse.dtype, torch.float32))
        return torch.stack((lse, torch.zeros_like(lse)), -1)
    lse, lost, top, log_sum = rows
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    return torch.stack((torch.where(lost, top, lse), torch.where(lost, log_sum, zero)), -1).expand(B, H, nq, 2) \
        .contiguous()


def backward(grad_out, query, key, value, attn_mask, out, lse, aux, scale, is_causal, mode_cp, factor):
    """ATen's exact gradients scaled to AttnLRP's (dQ, dK / 4, dV / 2), or CP-LRP's dV, of the call whose
    forward gave ``out``, ``lse`` and ``aux``; ``factor`` from ``row_factor`` (None: every row exact).

    AttnLRP scales dO by 1/4, which gives dQ and dK at once, and doubles dV, the smaller tensor under
    grouped-query attention (powers of two: exact in every dtype)."""
    weight = 1.0 if mode_cp else ATTNLRP_FACTORS['query_key']
    weight = weight if factor is None else (weight / factor)[..., None].to(grad_out.dtype)
    scaled = grad_out * weight  # in grad_out's layout, which the kernels read at its strides
    mask = _additive(attn_mask, query)
    hkv = key.shape[1]
    cuda = query.device.type == 'cuda'
    choice = _cuda_choice(query, key, value, attn_mask, scale, is_causal) if cuda else None

    def one(b):
        q, k, v, m = _fold(query, key, value, mask, b)
        g, o = (_fold(t, key, value, None, b)[0] for t in (scaled, out))
        lse_b = lse if b is None else lse[b].unflatten(0, (hkv, -1)).transpose(0, 1).contiguous()
        if not cuda:
            dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
                g, q, k, v, o, lse_b, 0.0, is_causal, attn_mask=m, scale=scale)
        else:
            dq, dk, dv = _cuda_backward(choice, g, q, k, v, m, o, lse_b, aux[b or 0], scale, is_causal)
        if b is None:
            return dq, dk, dv
        return _unfold_heads(dq), dk.sum(0, keepdim=True), dv.sum(0, keepdim=True)

    parts = _per_batch(query, key, one)
    dq, dk, dv = parts[0] if len(parts) == 1 else (torch.cat([p[i] for p in parts]) for i in range(3))
    if mode_cp:
        return (dv,)
    return dq, dk, dv.mul_(ATTNLRP_FACTORS['value'] / ATTNLRP_FACTORS['query_key'])


# CUDA: the three kernels behind SDPA, called as torch's own SDPA calls them (no dropout).

def _cuda_forward(choice, q, k, v, mask, scale, is_causal):
    """``(out, lse, aux)``; ``aux``: the forward's other results that its backward takes, passed on as torch's
    own autograd formula passes them (undefined sequence lengths for dense inputs, the philox state)."""
    name = _CUDA_KERNELS[choice]
    if name.endswith('flash_attention'):
        result = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)
        return result[0], result[1], tuple(result[2:8])  # cum_seq_q, cum_seq_k, max_q, max_k, seed, offset
    if name.endswith('efficient_attention'):
        result = _aten._scaled_dot_product_efficient_attention(q, k, v, _aligned(mask, q, k), True, 0.0, is_causal,
                                                                scale=scale)
        return result[0], result[1], tuple(result[2:4])  # philox seed, offset
    bias = None if mask is None else mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    result = _aten._scaled_dot_product_cudnn_attention(q, k, v, bias, True, 0.0, is_causal, False, scale=scale)
    return result[0], result[1], tuple(result[2:8])  # cum_seq_q, cum_seq_k, max_q, max_k, seed, offset


def _cuda_backward(choice, g, q, k, v, mask, out, lse, aux, scale, is_causal):
    name = _CUDA_KERNELS[choice]
    if name.endswith('flash_attention'):
        cum_q, cum_k, max_q, max_k, seed, offset = aux
        return _aten._scaled_dot_product_flash_attention_backward(
            g, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, is_causal, seed, offset, scale=scale)
    if name.endswith('efficient_attention'):
        seed, offset = aux
        dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
            g, q, k, v, _aligned(mask, q, k), out, lse, seed, offset, 0.0, [True, True, True, False], is_causal,
            scale=scale)
        return dq, dk, dv
    cum_q, cum_k, max_q, max_k, seed, offset = aux
    bias = None if mask is None else mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return _aten._scaled_dot_product_cudnn_attention_backward(
        g, q, k, v, out, lse, seed, offset, bias, cum_q, cum_k, max_q, max_k, 0.0, is_causal, scale=scale)


def _aligned(mask, q, k):
    """The bias as torch's SDPA hands it to the memory-efficient kernel (``preprocess_mask``): rows
    starting at multiples of 8 elements (padded, then sliced back), expanded to (B, H, Nq, Nk)."""
    if mask is None:
        return None
    if any(stride % 8 for size, stride in zip(mask.shape[:-1], mask.stride()[:-1]) if size > 1) \
            or mask.stride(-1) != 1:
        nk = mask.shape[-1]
        mask = torch.nn.functional.pad(mask, (0, (-nk) % 8 or 8))[..., :nk]
    return mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
