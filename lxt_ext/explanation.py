"""The one attribution entry point: a batch of inputs in, relevance out, one forward and one backward.

::

    from lxt_ext.composites import ViTEpsilon
    from lxt_ext.explanation import explain, explain_batch

    e = explain_batch(model, x, ViTEpsilon(), target=None)     # each row's top class
    e.relevance, e.target, e.score                             # like x; explained class; its logit
    for e in explain(model, images, ViTEpsilon(), batch_size=32, preprocess=normalise):
        ...                                                    # one Explanation per batch

The seed at the output is relevance (zennit's convention, which every lxt_ext composite keeps): the
explained logit at the explained class (``target``: None for each row's top class, an int for one class,
a LongTensor (N,) per row) and zero elsewhere, so the relevance sums to the explained logit up to what
biases and stabilisers absorb, for CNN, ViT and language composites alike. (``composite=None``, the plain
gradient, is seeded with the one-hot of the class: ``d f_t / d x``.) With ``top_k=k`` each row is explained for its k top classes in
the same single forward: the batch is repeated k times (rows ``i*k .. i*k+k-1`` are copies of row ``i``,
whose logits are identical), and copy ``j`` is seeded with the ``j``-th class; ``relevance`` is then
(N, k, ...), ``target`` and ``score`` (N, k).

What ``relevance`` is: lxt_ext's and zennit's LRP composites on image models emit relevance at the
first layer, so it is the gradient slot (zennit's convention); composites in the Gradient x Input
convention without a relevance-emitting first layer (``LanguageTransformer``) give ``x * grad``;
``composite=None`` is the plain gradient.
"""
from typing import NamedTuple

import torch

from . import checks
from .attribution import emits_relevance, frozen_parameters

__all__ = ['Explanation', 'Explainer', 'explain_batch', 'explain', 'emits_relevance', 'logits_of']


class Explanation(NamedTuple):
    output: torch.Tensor     # the model's logits (N, classes)
    relevance: torch.Tensor  # shaped like the input; (N, k, ...) with top_k
    target: torch.Tensor     # the explained class per row, (N,) or (N, k)
    score: torch.Tensor      # the explained logit per row, (N,) or (N, k)


def logits_of(output):
    """The logits of a model output: a tensor, transformers' ModelOutput (``.logits``) or a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, 'logits', None)  # transformers' ModelOutput
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f'the model (or forward function) must return logits, got {type(output).__name__}')


def _targets(logits, target, top_k):
    """The explained class of every row of ``logits`` (N*k rows with top_k, copies consecutive)."""
    rows = logits.shape[0]
    if top_k is not None:
        if target is not None:
            raise ValueError('give either target or top_k, not both')
        k = int(top_k)
        if not 1 <= k <= logits.shape[1]:
            raise ValueError(f'top_k must be between 1 and the number of classes ({logits.shape[1]}), got {top_k}')
        top = logits[::k].topk(k, dim=1).indices  # copies of a row have identical logits
        return top.reshape(-1)
    if target is None:
        return logits.argmax(1)
    if isinstance(target, torch.Tensor):
        if target.dim() == 0:
            target = target.expand(rows)
        if target.shape != (rows,) or target.is_floating_point():
            raise ValueError(f'target must be an int or an integer tensor of shape ({rows},), '
                             f'got {target.dtype} of shape {tuple(target.shape)}')
        target = target.to(device=logits.device, dtype=torch.long)
    else:
        target = torch.full((rows,), int(target), dtype=torch.long, device=logits.device)
    if ((target < 0) | (target >= logits.shape[1])).any():
        raise ValueError(f'target classes must lie in 0..{logits.shape[1] - 1}, got {target.tolist()}')
    return target


class Explainer:
    """``composite`` registered on ``model`` while in the ``with`` block (so a data set is explained with
    one registration); ``explainer(x, target=None, top_k=None)`` returns an :class:`Explanation` (per-layer
    NaN/Inf checks as ``lxt_ext.checks.located`` runs them).
    ``forward(model, x)`` computes the logits (default ``model(x)``; transformers' outputs are unwrapped)."""

    def __init__(self, model, composite=None, forward=None):
        self.model = model
        self.composite = composite
        self.forward = forward or (lambda model, x: model(x))
        self._emits = emits_relevance(composite)

    def __enter__(self):
        if self.composite is not None:
            self.composite.register(self.model)
        return self

    def __exit__(self, *exc):
        if self.composite is not None:
            self.composite.remove()
        return False

    def __call__(self, x, target=None, top_k=None):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f'the input must be a floating-point tensor, got '
                            f'{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}')
        checks.ensure_finite(x, 'the input')
        return checks.located(lambda: self._explain(x, target, top_k))

    def _explain(self, x, target, top_k):
        k = 1 if top_k is None else int(top_k)
        inputs = x.detach().repeat_interleave(k, dim=0) if k > 1 else x.detach()
        with torch.enable_grad(), frozen_parameters(self.model):
            inputs.requires_grad_()
            logits = logits_of(self.forward(self.model, inputs))
            if logits.dim() != 2 or logits.shape[0] != inputs.shape[0]:
                raise ValueError(f'expected logits of shape ({inputs.shape[0]}, classes), got {tuple(logits.shape)}')
            target = _targets(logits.detach(), target, top_k)
            seed = torch.nn.functional.one_hot(target, logits.shape[1]).to(logits.dtype)
            if self.composite is not None:
                seed = seed * logits.detach()  # relevance: the explained logit
            (grad,) = torch.autograd.grad(logits, inputs, seed)
        relevance = grad if self._emits else inputs.detach() * grad
        checks.ensure_finite(relevance, 'the relevance (check the model and the stabilizers of the composite)')
        logits = logits.detach()
        score = logits.gather(1, target[:, None])[:, 0]
        if top_k is None:
            return Explanation(logits, relevance, target, score)
        n = x.shape[0]
        return Explanation(logits[::k], relevance.view(n, k, *x.shape[1:]), target.view(n, k), score.view(n, k))


def explain_batch(model, x, composite=None, target=None, top_k=None, forward=None):
    """:class:`Explanation` of the batch ``x`` (registered and removed around it; see the module doc)."""
    with Explainer(model, composite, forward) as explainer:
        return explainer(x, target, top_k)


def explain(model, images, composite=None, target=None, top_k=None, batch_size=32, preprocess=None, forward=None):
    """One :class:`Explanation` per batch of ``images`` (a tensor (N, ...), split into ``batch_size``
    rows, or an iterable of batches), with ``composite`` registered once. ``preprocess(batch)`` runs
    first (e.g. normalisation); ``target`` as in :func:`explain_batch`, or a sequence/tensor of N
    classes, split with the batches."""
    if isinstance(images, torch.Tensor):
        if batch_size < 1:
            raise ValueError(f'batch_size must be positive, got {batch_size}')
        batches = images.split(batch_size)
    else:
        batches = images
    per_row = target is not None and not isinstance(target, int) and not (
        isinstance(target, torch.Tensor) and target.dim() == 0)
    targets = torch.as_tensor(target) if per_row else None
    start = 0
    with Explainer(model, composite, forward) as explainer:
        for batch in batches:
            rows = batch.shape[0]
            batch_target = targets[start:start + rows] if per_row else target
            start += rows
            yield explainer(preprocess(batch) if preprocess is not None else batch, batch_target, top_k)
