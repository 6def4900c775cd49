"""The one attribution entry point: a batch of inputs in, relevance out, one forward and one backward.

::

    from lxt_ext.attribution import Explainer, explain, explain_batch
    from lxt_ext.composites import ViTEpsilon, LanguageTransformer

    e = explain_batch(model, x, ViTEpsilon(), target=None)     # each row's top class
    e.relevance, e.target, e.score                             # like x; explained class; its logit
    for e in explain(model, images, ViTEpsilon(), batch_size=32, preprocess=normalise):
        ...                                                    # one Explanation per batch

    # a language model w.r.t. its input embeddings, with relevance at named layers
    with Explainer(model, LanguageTransformer(), forward=lambda m, x: m(inputs_embeds=x).logits,
                   layers=['model.layers.0', 'model.layers.3.mlp']) as explainer:
        e = explainer(embeds, target)          # the class at the last token
        e.latent['model.layers.3.mlp']         # that module's output * its gradient

The seed at the output is relevance (zennit's convention, which every lxt_ext composite keeps;
``lxt_ext.attribution.targets`` turns targets into seeds): class targets seed the explained logit, so the
relevance sums to it up to what biases and stabilisers absorb, for CNN, ViT and language composites alike.
``composite=None`` (the plain gradient) seeds the one-hot: ``d f_t / d x``. With ``top_k=k`` each row is
explained for its k top classes in the same single forward: the batch is repeated k times (rows
``i*k .. i*k+k-1`` are copies of row ``i``) and copy ``j`` is seeded with the ``j``-th class; ``relevance`` is
then (N, k, ...), ``target`` and ``score`` (N, k).

What ``relevance`` is: lxt_ext's and zennit's LRP composites on image models emit relevance at the first
layer, so it is the gradient slot (zennit's convention); composites in the Gradient x Input convention without
a relevance-emitting first layer (``LanguageTransformer``, w.r.t. input embeddings) give ``x * grad``, as the
relevance of a latent layer's output is ``output * grad``; ``composite=None`` is the plain gradient.
"""
import contextlib
from typing import NamedTuple

import torch

from .. import checks
from ..composites.transformer import TransformerComposite
from . import targets

__all__ = ['Explanation', 'Explainer', 'explain_batch', 'explain', 'concatenate', 'emits_relevance', 'logits_of',
           'frozen_parameters', 'check_input']


class Explanation(NamedTuple):
    """What an :class:`Explainer` returns (a named tuple of these fields).

    Parameters
    ----------
    output : torch.Tensor
        The model's output (logits), ``(N, ...)``.
    relevance : torch.Tensor
        Shaped like the input; ``(N, k, ...)`` with ``top_k``.
    target : torch.Tensor or None
        The explained class per row, ``(N,)`` or ``(N, k)``; None for a seed tensor or callable.
    score : torch.Tensor
        Per row, ``(N,)`` or ``(N, k)``: the explained logit for class targets, the seed's sum (the output
        relevance explained) for a seed tensor or callable.
    latent : dict
        ``output * grad`` of each module named in the explainer's ``layers``.
    """
    output: torch.Tensor
    relevance: torch.Tensor
    target: object
    score: torch.Tensor
    latent: dict


def concatenate(explanations):
    """One :class:`Explanation` of the rows of ``explanations`` (of consecutive chunks of one batch, in order).

    Parameters
    ----------
    explanations : sequence of Explanation
        Explanations of the same kind (the same ``top_k``, classes or seeds, latent layers).

    Returns
    -------
    Explanation
    """
    first = explanations[0]

    def join(values):
        if values[0] is None:
            return None
        if isinstance(values[0], dict):
            return {name: torch.cat([value[name] for value in values]) for name in values[0]}
        return torch.cat(values)

    return type(first)(*(join(values) for values in zip(*explanations)))


def emits_relevance(composite):
    """Whether the gradient w.r.t. the input is relevance itself (else relevance is ``x * grad``).

    Parameters
    ----------
    composite : zennit.core.Composite or None
        The composite (None: the plain gradient, which is what is asked for).

    Returns
    -------
    bool
    """
    if composite is None:
        return True
    return not isinstance(composite, TransformerComposite) or composite.explicit_first


def logits_of(output):
    """The logits of a model output: a tensor, transformers' ModelOutput (``.logits``) or a tuple's first tensor.

    Parameters
    ----------
    output : object
        What the model (or forward function) returned.

    Returns
    -------
    torch.Tensor
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, 'logits', None)  # transformers' ModelOutput
    if isinstance(logits, torch.Tensor):
        return logits
    if hasattr(output, 'to_tuple'):
        output = output.to_tuple()
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f'the model (or forward function) must return logits, got {type(output).__name__}')


@contextlib.contextmanager
def frozen_parameters(model):
    """``model``'s parameters with ``requires_grad`` off inside, as they were after: relevance needs no weight
    gradients, and without them autograd keeps no layer inputs for them (a plain Linear keeps its weight only).

    Parameters
    ----------
    model : torch.nn.Module or callable
        The model (a plain function has no parameters).

    Yields
    ------
    None
    """
    parameters = model.parameters() if isinstance(model, torch.nn.Module) else ()
    thawed = [parameter for parameter in parameters if parameter.requires_grad]
    for parameter in thawed:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in thawed:
            parameter.requires_grad_(True)


class Explainer:
    """``composite`` registered on ``model`` while in the ``with`` block (so a data set is explained with one
    registration); ``explainer(x, target=None, top_k=None)`` returns an :class:`Explanation`.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    composite : zennit.core.Composite, optional
        An lxt_ext or zennit composite; None: the plain gradient.
    forward : callable, optional
        ``forward(model, x) -> output`` (default ``model(x)``; transformers' outputs give their ``.logits``).
    layers : sequence of str, optional
        Names of modules whose output relevance (``output * grad``) is returned in ``Explanation.latent``.
    """

    def __init__(self, model, composite=None, forward=None, layers=()):
        self.model = model
        self.composite = composite
        self.forward = forward or (lambda model, x: model(x))
        self.layers = list(layers)
        modules = dict(model.named_modules()) if isinstance(model, torch.nn.Module) else {}
        unknown = [name for name in self.layers if name not in modules]
        if unknown:
            raise KeyError(f'no modules named {unknown} in {type(model).__name__}')
        self._modules = {name: modules[name] for name in self.layers}
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
        """The :class:`Explanation` of the batch ``x`` (per-layer NaN/Inf checks as ``lxt_ext.checks.located``
        runs them).

        Parameters
        ----------
        x : torch.Tensor
            The input batch (floating point, on the model's device and in its dtype).
        target : None, int, torch.Tensor or callable, optional
            What is explained (``lxt_ext.attribution.targets``).
        top_k : int, optional
            Explain each row for its k top classes.

        Returns
        -------
        Explanation
        """
        check_input(self.model, x)
        return checks.located(lambda: self._explain(x, target, top_k))

    def _explain(self, x, target, top_k):
        k = 1 if top_k is None else int(top_k)
        inputs = x.detach().repeat_interleave(k, dim=0) if k > 1 else x.detach()
        outputs = {}
        handles = [module.register_forward_hook(self._capture(name, outputs)) for name, module in self._modules.items()]
        try:
            with torch.enable_grad(), frozen_parameters(self.model):
                inputs.requires_grad_()
                # a copy: model code may scale its input in place (CTRL), which a leaf that requires grad (or the
                # caller's tensor, whose storage a detached input shares) must not see
                output = logits_of(self.forward(self.model, inputs.clone()))
                if output.shape[:1] != inputs.shape[:1]:
                    raise ValueError(f'expected an output of {inputs.shape[0]} rows, got shape {tuple(output.shape)}')
                seed, chosen = targets.seed(output, target, top_k, relevance=self.composite is not None)
                seed = checks.ensure_finite(seed, 'the output relevance seed (target)')
                names = list(outputs)
                grads = _gradients(output, [inputs] + [outputs[name] for name in names], seed)
        finally:
            for handle in handles:
                handle.remove()
        latent = {name: (outputs[name] * grad).detach() if grad is not None else torch.zeros_like(outputs[name])
                  for name, grad in zip(names, grads[1:])}
        grad = torch.zeros_like(inputs) if grads[0] is None else grads[0]
        relevance = grad if self._emits else inputs.detach() * grad
        checks.ensure_finite(relevance, 'the input relevance (check the model and the stabilizers of the composite)')
        output = output.detach()
        if chosen is None:
            score = seed.flatten(1).sum(1)
        else:
            score = targets.scores_of(output).gather(1, chosen[:, None])[:, 0]
        if top_k is None:
            return Explanation(output, relevance.detach(), chosen, score, latent)
        n = x.shape[0]
        return Explanation(output[::k], relevance.detach().view(n, k, *x.shape[1:]), chosen.view(n, k),
                           score.view(n, k), latent)

    @staticmethod
    def _capture(name, outputs):
        def hook(module, args, output):
            try:
                tensor = logits_of(output)
            except TypeError:
                tensor = None
            if tensor is None or not tensor.requires_grad:
                raise RuntimeError(f'latent relevance at {name!r}: its output is not a tensor that requires grad')
            outputs[name] = tensor
        return hook


def check_input(model, x):
    """Refuse an input the model cannot be explained for: not a floating tensor, on another device or in another
    dtype than the model's parameters, or not finite.

    Parameters
    ----------
    model : torch.nn.Module or callable
        The model.
    x : torch.Tensor
        The input batch.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f'the input must be a floating-point tensor (images, input embeddings: a floating tensor '
                        f'input), got {got}')
    parameters = model.parameters() if isinstance(model, torch.nn.Module) else ()
    parameter = next((p for p in parameters if p.is_floating_point()), None)
    if parameter is not None and x.device != parameter.device:
        raise ValueError(f'the input is on {x.device} but {type(model).__name__} is on {parameter.device}')
    if parameter is not None and x.dtype != parameter.dtype:
        raise TypeError(f'the input dtype {x.dtype} differs from the dtype {parameter.dtype} of '
                        f'{type(model).__name__}\'s parameters')
    checks.ensure_finite(x, 'the input')


def _gradients(output, tensors, seed):
    try:
        return torch.autograd.grad(output, tensors, seed, allow_unused=True)
    except RuntimeError as error:
        if 'use_reentrant' not in str(error):
            raise
        raise RuntimeError(
            'the model uses reentrant activation checkpointing, which cannot give the gradient of an input; enable '
            "it as non-reentrant, e.g. for transformers model.activation_checkpointing_enable({'use_reentrant': "
            'False})') from error


def explain_batch(model, x, composite=None, target=None, top_k=None, forward=None):
    """The :class:`Explanation` of the batch ``x``, ``composite`` registered and removed around it.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    x : torch.Tensor
        The input batch.
    composite : zennit.core.Composite, optional
        None: the plain gradient.
    target : None, int, torch.Tensor or callable, optional
        What is explained (``lxt_ext.attribution.targets``).
    top_k : int, optional
        Explain each row for its k top classes.
    forward : callable, optional
        ``forward(model, x) -> output``.

    Returns
    -------
    Explanation
    """
    with Explainer(model, composite, forward) as explainer:
        return explainer(x, target, top_k)


def explain(model, images, composite=None, target=None, top_k=None, batch_size=32, preprocess=None, forward=None):
    """One :class:`Explanation` per batch of ``images``, with ``composite`` registered once.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    images : torch.Tensor or iterable of torch.Tensor
        A tensor (N, ...), split into ``batch_size`` rows, or an iterable of batches.
    composite : zennit.core.Composite, optional
        None: the plain gradient.
    target : None, int, sequence or torch.Tensor, optional
        As in :func:`explain_batch`, or N classes, split with the batches.
    top_k : int, optional
        Explain each row for its k top classes.
    batch_size : int
        Rows per batch of a tensor ``images``.
    preprocess : callable, optional
        Applied to each batch first (e.g. normalisation).
    forward : callable, optional
        ``forward(model, x) -> output``.

    Yields
    ------
    Explanation
        One per batch.
    """
    if isinstance(images, torch.Tensor):
        if batch_size < 1:
            raise ValueError(f'batch_size must be positive, got {batch_size}')
        batches = images.split(batch_size)
    else:
        batches = images
    per_row = target is not None and not isinstance(target, int) and not (
        isinstance(target, torch.Tensor) and target.dim() == 0)
    rows_targets = torch.as_tensor(target) if per_row else None
    start = 0
    with Explainer(model, composite, forward) as explainer:
        for batch in batches:
            rows = batch.shape[0]
            batch_target = rows_targets[start:start + rows] if per_row else target
            start += rows
            yield explainer(preprocess(batch) if preprocess is not None else batch, batch_target, top_k)
