"""Conservation check: relevance in vs out of every module call, for people porting an architecture.

The relevance of a tensor t, by the composite's convention:

- Gradient x Input (lxt_ext's transformer composites; ``composite=None``, the plain gradient):
  ``R_t = sum(t * g_t)``, with ``g_t`` the gradient of t;
- explicit (zennit's composites, and the tensors before a transformer composite's first layer, whose
  rule emits relevance): ``R_t = sum(g_t)``.

For each module call, ``R_out`` sums over its output tensors (``g``: what arrives from every consumer)
and ``R_in`` over its input tensors (``g``: what this call alone sends back; each input passes an
identity autograd node of its own, so the other uses of a residual stream do not count). A conservative
rule has ``R_in = R_out``. Leaks add up: relevance passes linear operations (adds, reshapes,
concatenation) exactly in both conventions, so a module's ``leak = R_in - R_out`` is the sum of the
leaks of the calls and operations inside it, and ``own = leak - sum(children's leaks)`` is what its own
code (functional operations between its children, constants it adds) loses or creates. Modules run
without their hooks (``module.forward(x)`` called directly, or the children a rule computes
functionally, like ``nn.MultiheadAttention``'s projections) count as their caller's own code.

Problems, in the order relevance meets them (``ConservationReport.modules``: backward order, the
model's last module first and children before the module holding them):

- ``nan``: the relevance leaving a module (R_in) holds NaN/Inf although the relevance arriving (R_out)
  is finite; ``nan in forward``: a module's output turned NaN/Inf from finite inputs (checked first, in
  forward order);
- ``explodes``: ``sum|r_in| > explode * max(sum|r_out|, |R_model|)`` where no child exploded;
- ``leaks``: ``|own| > rtol * max(|R_out|, |R_model|) + 64 eps(dtype) * mass``, the second term the
  rounding of the sums (``mass``: the summed ``|r|`` of the module's and its descendants' inputs and
  outputs), ``R_model`` the relevance of the explained output.

AttnLRP's softmax rule does not conserve by design: attention modules under it are marked ``attnlrp``
and their own leak is no problem (check with ``attention='cp'`` for a strict test). Biases and other
additive constants take relevance too: ``zero_bias`` zeroes them for the check (``ADDITIVE``; the
model is restored bitwise afterwards).

The check keeps a copy of every module input on the relevance path until the backward is done.
"""
import contextlib
import fnmatch
import math

import torch

from ..attribution import logits_of
from ..attribution.targets import seed
from ..checks import NonFiniteError
from ..composites.transformer import TransformerComposite
from ..transformer.convention import relevance_seeded
from .monitor import _Monitor
from .report import ConservationError, ConservationReport, ModuleRelevance

__all__ = ['ADDITIVE', 'ADDITIVE_MODULES', 'ModuleRelevance', 'ConservationReport', 'ConservationError',
           'conservation', 'zeroed']

# Names (fnmatch patterns of parameter and buffer names) of the additive constants ``zero_bias`` zeroes:
# biases, BatchNorm's running mean (its bias is b - mean * w / std), and the embeddings that
# torchvision, timm and transformers add to the relevance path: position tables (TNT's, Hiera's windowed ones,
# NaFlexViT's factorised ones too), class, distillation and register tokens (CoaT's per stage), token types, the
# per-layer token embeddings of Gemma 3n and 4, ProphetNet's n-gram and PEGASUS-X's global tokens, Perceiver's
# latents.
ADDITIVE = ('*bias', '*running_mean', '*pos_embedding', '*pos_embed', '*pos_embed[0-9]', '*pos_embed_[0-9]',
            '*pos_embed_window', '*pos_embed_spatial', '*pos_embed_temporal', '*pos_embed_x', '*pos_embed_y',
            '*patch_pos', '*pixel_pos', '*pos_encoding', '*class_token', '*cls_token*', '*dist_token', '*reg_token',
            '*class_embedding', '*embeddings.latents', '*position_embedding.weight', '*position_embeddings*',
            '*token_type_embeddings*', '*wpe.weight', '*embed_positions.weight', '*embed_positions.weights',
            '*positions_embed.weight', '*embed_tokens_per_layer.weight', '*ngram_embeddings.weight',
            '*embed_global.weight')
# Class names (fnmatch patterns) of modules that compute an additive constant, a function of the positions alone:
# sinusoidal position tables (PEGASUS-X, Marian, M2M100, ...; not RoFormer's, which rotates), XCiT's Fourier
# encoding, MarkupLM's XPath embeddings of the (absent) tag ids. ``zeroed`` zeroes their outputs.
ADDITIVE_MODULES = ('*SinusoidalPositionalEmbedding', 'PositionalEncodingFourier', 'XPathEmbeddings')
_ROTARY = ('RoFormerSinusoidalPositionalEmbedding',)


@contextlib.contextmanager
def zeroed(model, patterns=ADDITIVE, modules=ADDITIVE_MODULES):
    """Zero the floating parameters and buffers of ``model`` whose names match ``patterns`` (fnmatch), and the
    outputs of its modules whose class names match ``modules``, while in the context (yielding their names);
    restored bitwise afterwards.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose constants are zeroed.
    patterns : tuple of str, optional
        fnmatch patterns of parameter and buffer names (default ``ADDITIVE``: biases, position and
        class-token embeddings, running means).
    modules : tuple of str, optional
        fnmatch patterns of module class names (default ``ADDITIVE_MODULES``: position tables computed in the
        forward).

    Yields
    ------
    list of str
        The names of the tensors and modules zeroed.
    """
    saved, handles = [], []

    def zero_output(module, args, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            return torch.zeros_like(output)
        return None

    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and any(fnmatch.fnmatchcase(name, p) for p in patterns):
                saved.append((name, tensor, tensor.clone()))
                tensor.zero_()
    names = [name for name, _, _ in saved]
    for name, module in model.named_modules():
        kind = type(module).__name__
        if any(fnmatch.fnmatchcase(kind, p) for p in modules) and kind not in _ROTARY:
            handles.append(module.register_forward_hook(zero_output))
            names.append(name)
    try:
        yield names
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for _, tensor, value in saved:
                tensor.copy_(value)


def conservation(model, input, composite=None, forward=None, target=None, zero_bias=True, zero=(), rtol=1e-3,
                 explode=1e3, convention=None):
    """Relevance in vs out of every module of ``model`` for one forward and backward of ``input``.

    ``composite`` is registered for the call (None: the plain gradient, or whatever is registered
    already); ``forward(model, x)`` runs the model (default ``model(x)``; it may return a tensor, a tuple
    or a transformers ModelOutput, whose first tensor is explained); ``target`` as in
    ``lxt_ext.attribution.targets`` (an int class, None for the top class, a seed tensor or a
    callable ``output -> seed``). ``rtol``: the leak allowed per module (see the module doc; the epsilon
    rule absorbs about ``eps / |z|`` by design, which random-weight models with small outputs ``z`` bring
    near 1e-4). ``zero_bias`` zeroes the constants named in ``ADDITIVE`` for the check,
    ``zero`` more name patterns; the model is restored afterwards. ``convention``: ``'gradient_x_input'``
    or ``'explicit'`` (default: Gradient x Input for lxt_ext's transformer composites and the plain
    gradient, explicit for any other composite, e.g. zennit's). Returns a ``ConservationReport``
    (``print`` it for the table; ``.check()`` raises ``ConservationError`` naming the first module with a
    problem).

    Parameters
    ----------
    model : torch.nn.Module
        The model to check.
    input : torch.Tensor
        A floating input (images, or the input embeddings of a text model).
    composite : zennit.core.Composite, optional
        Registered for the call; None: the plain gradient, or the rules registered already.
    forward : callable, optional
        ``forward(model, x)`` runs the model (default ``model(x)``).
    target : int, torch.Tensor or callable, optional
        What is explained: a class, None for the top class, a seed tensor or ``output -> seed``.
    zero_bias : bool, optional
        Zero the constants named in ``ADDITIVE`` for the check (default True).
    zero : tuple of str, optional
        More fnmatch patterns of parameters and buffers to zero.
    rtol : float, optional
        The leak allowed per module, relative to the larger of its output relevance and the model's
        (default 1e-3).
    explode : float, optional
        A module explodes where ``sum|r_in|`` exceeds this multiple of ``sum|r_out|`` (default 1e3).
    convention : {'gradient_x_input', 'explicit'}, optional
        How tensors' relevance is read (default: from the composite).

    Returns
    -------
    ConservationReport
        Every module's relevance in and out, in backward order, and the first problem.
    """
    if convention is None:
        convention = 'gradient_x_input' if composite is None or isinstance(composite, TransformerComposite) \
            else 'explicit'
    if convention not in ('gradient_x_input', 'explicit'):
        raise ValueError(f"convention must be 'gradient_x_input' or 'explicit', got {convention!r}")
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        raise TypeError('conservation explains a floating tensor input (e.g. images or input embeddings), got '
                        f'{input.dtype if isinstance(input, torch.Tensor) else type(input).__name__}')
    forward = forward or (lambda model, x: model(x))
    patterns = (ADDITIVE if zero_bias else ()) + tuple(zero)
    stopped, output_relevance = None, math.nan
    with zeroed(model, patterns) as names:
        registered = composite.context(model) if composite is not None else contextlib.nullcontext()
        with registered, _Monitor(model, convention == 'explicit') as monitor, torch.enable_grad():
            x = input.detach().requires_grad_()
            try:
                try:
                    output = logits_of(forward(model, x))
                except TypeError:
                    output = None
                if output is None or not output.requires_grad:
                    raise ValueError('the forward must return a tensor (e.g. the logits) that depends on the input')
                grad_output, _ = seed(output, target)  # relevance (zennit's convention) in both conventions
                with torch.no_grad():
                    output_relevance = float(grad_output.double().sum())
                if convention == 'gradient_x_input' and not monitor.output_seeded:
                    output = relevance_seeded(output)  # no transformer composite: the plain gradient
                torch.autograd.grad(output, x, grad_output, allow_unused=True)
            except NonFiniteError as error:
                stopped = f'{type(error).__name__}: {error}'
    return monitor.report(output_relevance, rtol, explode, names, stopped)
