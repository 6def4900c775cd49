"""Attribution baselines to compare the LRP composites against, each
``method(model, x, target, forward=None) -> relevance shaped like x``.

``x`` is the model's input batch (already normalised), ``target`` a LongTensor (N,) of the classes
to explain (one per row), ``forward(model, x) -> logits`` how to call the model (default ``model(x)``;
an output with a ``.logits`` attribute, as Hugging Face models return, is unwrapped). The model is
left in the mode it is in (call ``model.eval()`` first). The explained quantity is the target logit
``f_t(x)`` of each row; rows are independent, so one backward of the sum of the rows' logits gives
every row's gradient.
"""
import math

import torch
from zennit.attribution import IntegratedGradients, SmoothGrad

from .._docstrings import shared_parameters

from .explainer import explain_batch, logits_of
from .targets import class_seed

__all__ = ['gradient', 'gradient_x_input', 'integrated_gradients', 'smoothgrad', 'attention_rollout', 'METHODS']


def _call(model, x, forward):
    return logits_of(model(x) if forward is None else forward(model, x))


def _check(x, target):
    if not isinstance(target, torch.Tensor) or target.dtype != torch.long or target.shape != x.shape[:1]:
        raise ValueError(f'target must be a LongTensor of shape ({x.shape[0]},) (one class per row), got '
                         f'{target.dtype if isinstance(target, torch.Tensor) else type(target).__name__} '
                         f'{tuple(target.shape) if isinstance(target, torch.Tensor) else ""}'.rstrip())
    return target.to(x.device)


def _one_hot(target):
    """zennit's ``attr_output`` for the gradient methods: the one-hot seed of each row's target class."""
    return lambda logits: class_seed(logits, target, relevance=False)


@shared_parameters('attributed_model', 'attributed_input', 'class_target', 'logits_forward')
def gradient(model, x, target, forward=None):
    """Saliency: ``d f_t(x) / d x``.

    Returns
    -------
    torch.Tensor
        Relevance shaped like ``x``.
    """
    return explain_batch(model, x, None, target=_check(x, target), forward=forward).relevance


@shared_parameters('attributed_model', 'attributed_input', 'class_target', 'logits_forward')
def gradient_x_input(model, x, target, forward=None):
    """Gradient x Input: ``x * d f_t(x) / d x`` (for a bias-free ReLU network it sums to ``f_t(x)``).

    Returns
    -------
    torch.Tensor
        Relevance shaped like ``x``.
    """
    return x.detach() * gradient(model, x, target, forward)


class _Logits(torch.nn.Module):
    """``forward(model, x)`` as a module returning logits, the form zennit's attributors call."""

    def __init__(self, model, forward):
        super().__init__()
        self.model = model
        self.call = forward

    def forward(self, x):
        return _call(self.model, x, self.call)


def _zennit(attributor, x, target):
    with torch.enable_grad():
        _, attribution = attributor(x.detach(), _one_hot(target))
    return attribution


@shared_parameters('attributed_model', 'attributed_input', 'class_target', 'logits_forward', leading=True)
def integrated_gradients(model, x, target, forward=None, n_iter=20, baseline=None):
    """Integrated gradients (zennit's ``IntegratedGradients``): the right Riemann sum
    ``(x - b) * (1/n) sum_{i=1..n} grad f_t(b + (i/n) (x - b))`` with baseline ``b`` (default zeros;
    a tensor broadcastable to ``x``). Sums to ``f_t(x) - f_t(b)`` as ``n`` grows.

    Parameters
    ----------
    n_iter : int, optional
        The number of steps ``n`` (default 20).
    baseline : torch.Tensor, optional
        The baseline ``b``, broadcastable to ``x`` (default zeros).

    Returns
    -------
    torch.Tensor
        Relevance shaped like ``x``.
    """
    target = _check(x, target)
    baseline_fn = None if baseline is None else (lambda input: torch.broadcast_to(baseline.to(input), input.shape))
    return _zennit(IntegratedGradients(_Logits(model, forward), n_iter=n_iter, baseline_fn=baseline_fn), x, target)


@shared_parameters('attributed_model', 'attributed_input', 'class_target', 'logits_forward', leading=True)
def smoothgrad(model, x, target, forward=None, n_iter=20, noise_level=0.1):
    """SmoothGrad (zennit's ``SmoothGrad``): the mean gradient over ``n_iter`` copies of ``x`` with
    Gaussian noise of standard deviation ``noise_level * (max(x_i) - min(x_i))`` per row ``i``, the last
    copy noise-free. Uses torch's global random generator (seed it for reproducible maps).

    Parameters
    ----------
    n_iter : int, optional
        The number of copies (default 20).
    noise_level : float, optional
        The noise's standard deviation relative to each row's value range (default 0.1).

    Returns
    -------
    torch.Tensor
        Relevance shaped like ``x``.
    """
    target = _check(x, target)
    return _zennit(SmoothGrad(_Logits(model, forward), n_iter=n_iter, noise_level=noise_level), x, target)


def _mha_probs(module, args, kwargs, output):
    """``nn.MultiheadAttention`` (torchvision's ViT): the module itself asked for per-head weights."""
    kwargs = {**kwargs, 'need_weights': True, 'average_attn_weights': False}
    return module(*args, **kwargs)[1]


def _timm_probs(module, args, kwargs, output):
    """timm's ``Attention``: ``softmax(scale * q_norm(q) k_norm(k)^T)`` from its input, as its unfused path."""
    x = args[0] if args else kwargs['x']
    b, n, _ = x.shape
    q, k, _ = module.qkv(x).reshape(b, n, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    scores = module.q_norm(q) * module.scale @ module.k_norm(k).transpose(-2, -1)
    mask = kwargs.get('attn_mask', args[1] if len(args) > 1 else None)
    if mask is not None or kwargs.get('is_causal'):
        raise ValueError('attention_rollout: masked or causal timm attention is not supported')
    return scores.softmax(-1)


def _hf_probs(module, args, kwargs, output):
    """transformers' ViT-style attention (``q_proj``, ``k_proj``, ``head_dim``, ``scaling``)."""
    hidden = args[0] if args else kwargs['hidden_states']
    if (args[1] if len(args) > 1 else kwargs.get('attention_mask')) is not None:
        raise ValueError('attention_rollout: masked transformers attention is not supported')
    shape = (*hidden.shape[:-1], -1, module.head_dim)
    q = module.q_proj(hidden).view(shape).transpose(1, 2)
    k = module.k_proj(hidden).view(shape).transpose(1, 2)
    return (q @ k.transpose(-2, -1) * module.scaling).softmax(-1)


def _probs_function(module):
    if isinstance(module, torch.nn.MultiheadAttention):
        return _mha_probs
    cls = type(module)
    if cls.__module__.startswith('timm.') and cls.__name__ == 'Attention' and hasattr(module, 'qkv'):
        return _timm_probs
    if cls.__module__.startswith('transformers.') and all(
            hasattr(module, a) for a in ('q_proj', 'k_proj', 'head_dim', 'scaling')):
        return _hf_probs
    return None


def _prefix_tokens(model):
    """Tokens before the patches: timm's ``num_prefix_tokens``, else one class token."""
    inner = getattr(model, 'model', model)
    prefix = getattr(inner, 'num_prefix_tokens', getattr(model, 'num_prefix_tokens', 1))
    if prefix < 1:
        raise ValueError('attention_rollout reads the class token row; this model has no class token')
    return prefix


@shared_parameters('attributed_model', leading=True)
def attention_rollout(model, x, target=None, forward=None, residual=0.5):
    """Attention rollout (Abnar & Zuidema 2020) of a ViT on the plain model: per layer the attention
    probabilities averaged over heads, mixed with the identity for the residual path,
    ``A_l = residual * I + (1 - residual) * mean_h P_l`` (rows still sum to 1), multiplied from the first
    layer to the last, ``R = A_L ... A_1``; the class token's row over the patch tokens, upsampled
    bilinearly to the image and spread evenly over the channels (so the channel sum is the map).

    Class-agnostic: ``target`` is checked but does not change the map. The probabilities are
    captured by forward hooks on torchvision's ``nn.MultiheadAttention``, timm's ``Attention`` and
    transformers' ViT attention, recomputed from each module's input (one extra attention product per
    layer).

    Parameters
    ----------
    x : torch.Tensor
        The image batch (N, C, H, W), already normalised.
    target : torch.Tensor, optional
        A LongTensor (N,), checked only.
    forward : callable, optional
        ``forward(model, x) -> logits`` (default ``model(x)``).
    residual : float, optional
        The weight of the identity in each layer's mix (default 0.5).

    Returns
    -------
    torch.Tensor
        The map, shaped like ``x``.
    """
    if x.dim() != 4:
        raise ValueError(f'attention_rollout takes an image batch (N, C, H, W), got shape {tuple(x.shape)}')
    if target is not None:
        _check(x, target)
    layers, handles, busy = [], [], []

    def capture(module, args, kwargs, output):
        if busy:  # the module called again from inside this hook
            return
        busy.append(True)
        try:
            layers.append(_probs_function(module)(module, args, kwargs, output).detach().float())
        finally:
            busy.pop()

    for module in model.modules():
        if _probs_function(module) is not None:
            handles.append(module.register_forward_hook(capture, with_kwargs=True))
    if not handles:
        raise ValueError(f'attention_rollout found no attention module it knows in {type(model).__name__} '
                         f'(torch.nn.MultiheadAttention, timm Attention, transformers ViT attention)')
    try:
        with torch.no_grad():
            _call(model, x.detach(), forward)
    finally:
        for handle in handles:
            handle.remove()
    tokens = layers[0].shape[-1]
    rollout = torch.eye(tokens, device=x.device).expand(x.shape[0], tokens, tokens)
    for probs in layers:
        rollout = (residual * torch.eye(tokens, device=x.device) + (1 - residual) * probs.mean(1)) @ rollout
    prefix = _prefix_tokens(model)
    cls_row = rollout[:, 0, prefix:]
    h, w = x.shape[-2:]
    grid_h = round(math.sqrt(cls_row.shape[1] * h / w))
    grid_w = cls_row.shape[1] // max(grid_h, 1)
    if grid_h * grid_w != cls_row.shape[1]:
        raise ValueError(f'{cls_row.shape[1]} patch tokens do not form a grid of the image\'s aspect ({h} x {w})')
    heat = torch.nn.functional.interpolate(cls_row.view(-1, 1, grid_h, grid_w), size=(h, w), mode='bilinear',
                                           align_corners=False)
    return (heat / x.shape[1]).expand_as(x).to(x.dtype).contiguous()


METHODS = {'gradient': gradient, 'gradient_x_input': gradient_x_input, 'integrated_gradients': integrated_gradients,
           'smoothgrad': smoothgrad, 'attention_rollout': attention_rollout}
