"""Generated text explained from one forward: the whole answer's relevance and the token-to-token matrix.

::

    from lxt_ext.attribution.generation import explain_generation
    from lxt_ext.composites import LanguageTransformer

    ids = model.generate(prompt_ids, max_new_tokens=32, do_sample=False)[0]      # prompt + answer
    g = explain_generation(model, ids, prompt_ids.shape[1], LanguageTransformer(attention='attnlrp'))
    g.relevance          # (tokens,) each token's relevance for the whole answer
    g.matrix             # (answer, tokens) row i: every token's relevance for generated token i

A causal language model's forward over prompt + answer gives every step's logits at once: the logits at
position ``p - 1`` are those the model generated token ``p`` from, computed from tokens ``0..p-1`` only (causal
masking), exactly what the step-by-step loop (a forward and a backward per step on the growing prefix, as
inseq runs it) computes. So one forward suffices: the whole answer is one backward of the sum of every step's
seed; the matrix one backward per generated token over the retained graph (its floor), memory bounded by that
one graph. Each row is zero from its own token on; the rows sum to the whole answer's relevance (the backward
of every composite is linear in its seed).

The seeds (``lxt_ext.attribution.targets.token_seeds``) are relevance: the chosen token's logit, its
log-probability's gradient times the logits, or the contrastive mask times the logits (LXT's meanings).
Relevance is w.r.t. the input embeddings, ``x * grad`` summed over the embedding dimension (the composite's own
reading where it emits relevance at the embedding).
"""
import inspect
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from .. import checks
from .explainer import Explainer, check_input, emits_relevance, frozen_parameters, logits_of
from .targets import TOKEN_TARGETS, token_seeds

__all__ = ['GenerationExplanation', 'explain_generation', 'one_forward', 'TOKEN_TARGETS']


class GenerationExplanation(NamedTuple):
    """What :func:`explain_generation` returns (a named tuple of these fields).

    Parameters
    ----------
    ids : torch.Tensor
        ``(tokens,)`` the prompt and the answer.
    prompt_length : int
        How many of ``ids`` are the prompt.
    relevance : torch.Tensor
        ``(tokens,)`` each token's relevance for the whole answer (zero at the last token, which no step reads).
    matrix : torch.Tensor or None
        ``(answer, tokens)``: row ``i`` holds every token's relevance for generated token ``i`` (position
        ``prompt_length + i``), zero from that position on; None unless asked for.
    scores : torch.Tensor
        ``(answer,)`` the value each generated token's seed explains (its logit, or as ``target`` says): the sum
        of its row under a conservative composite.
    log_probs : torch.Tensor
        ``(answer,)`` each generated token's log-probability, for display.
    target : str
        What each generated token's seed explains (``'logit'``, ``'log_prob'``, ``'contrastive'``).
    """
    ids: torch.Tensor
    prompt_length: int
    relevance: torch.Tensor
    matrix: object
    scores: torch.Tensor
    log_probs: torch.Tensor
    target: str


def _default_forward(model, embeds, keep, **inputs):
    """transformers' causal LMs from input embeddings (and the keyword ``inputs``), with logits only at the ``keep``
    last positions where the model takes ``logits_to_keep`` (the LM head over every position would cost a
    vocabulary-wide matmul each)."""
    forward = getattr(model, 'forward', model)
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        parameters = {}
    if 'logits_to_keep' in parameters:
        return logits_of(model(inputs_embeds=embeds, logits_to_keep=keep, **inputs))
    return logits_of(model(inputs_embeds=embeds, **inputs))


def _output_head(model):
    """The module that maps the last hidden states to the logits (transformers' ``get_output_embeddings()``),
    or None."""
    get = getattr(model, 'get_output_embeddings', None)
    head = get() if callable(get) else None
    return head if isinstance(head, torch.nn.Module) else None


def _token_ids(ids, prompt_length):
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f'ids must be an integer tensor of token ids, got '
                        f'{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}')
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f'explain one sequence at a time: ids of shape (tokens,) or (1, tokens), got '
                         f'{tuple(ids.shape)}')
    prompt_length = int(prompt_length)
    if not 1 <= prompt_length < ids.shape[0]:
        raise ValueError(f'prompt_length must leave at least one prompt token and one generated token: '
                         f'1 <= prompt_length < {ids.shape[0]}, got {prompt_length}')
    return ids, prompt_length


def explain_generation(model, ids, prompt_length, composite, target='logit', matrix=True, forward=None, embed=None,
                       progress=False):
    """The relevance of a generated (or given) continuation, from one forward over prompt + answer.

    Parameters
    ----------
    model : torch.nn.Module
        A causal language model (transformers' ``...ForCausalLM`` or one with the same call).
    ids : torch.Tensor
        ``(tokens,)`` or ``(1, tokens)``: the prompt followed by the answer.
    prompt_length : int
        How many of ``ids`` are the prompt (at least 1, fewer than all).
    composite : zennit.core.Composite or None
        The rules (``LanguageTransformer(attention='attnlrp')`` or ``'cp'``); None: gradient x input, with the
        gradient masks of ``target`` as seeds.
    target : {'logit', 'log_prob', 'contrastive'}
        What each generated token's seed explains (``lxt_ext.attribution.targets.token_seeds``).
    matrix : bool
        Also the token-to-token matrix (one backward per generated token over the one forward's graph).
    forward : callable, optional
        ``forward(model, embeds, keep) -> logits`` of shape ``(1, tokens or more, vocabulary)`` whose last
        ``keep`` positions are the last ``keep`` tokens' (default: transformers' ``inputs_embeds`` call with
        ``logits_to_keep=keep`` where the model takes it).
    embed : callable, optional
        ``embed(ids) -> embeddings`` (default ``model.get_input_embeddings()``).
    progress : bool
        A progress bar over the matrix's rows.

    Returns
    -------
    GenerationExplanation
    """
    explanation, _ = one_forward(model, ids, prompt_length, composite, target, matrix, forward, embed, progress)
    return explanation


def one_forward(model, ids, prompt_length, composite, target='logit', matrix=True, forward=None, embed=None,
                progress=False, inputs=()):
    """:func:`explain_generation`, and the relevance of more differentiable ``inputs`` of the same forward (the
    pixels of a vision-language model: ``lxt_ext.attribution.multimodal``).

    Parameters
    ----------
    model, ids, prompt_length, composite, target, matrix, embed, progress
        As in :func:`explain_generation`.
    forward : callable, optional
        ``forward(model, embeds, keep, *inputs) -> logits`` (as in :func:`explain_generation`, the ``inputs``
        after ``keep``).
    inputs : sequence of torch.Tensor
        Floating tensors the forward takes besides the embeddings (on the model's device, in its dtype).

    Returns
    -------
    tuple of (GenerationExplanation, list of (torch.Tensor, torch.Tensor or None))
        The explanation of the tokens, and per tensor of ``inputs`` its relevance (shaped like it: ``x * grad``,
        or the gradient where the composite emits relevance) for the whole answer and, with ``matrix``, per
        generated token (``(answer, *shape)``, rows as the token matrix's).
    """
    if target not in TOKEN_TARGETS:
        raise ValueError(f'target must be one of {TOKEN_TARGETS}, got {target!r}')
    ids, prompt_length = _token_ids(ids, prompt_length)
    embed = embed or model.get_input_embeddings()
    forward = forward or _default_forward
    answer = ids.shape[0] - prompt_length
    with torch.no_grad():
        embeds = embed(ids[None])
    check_input(model, embeds)
    inputs = tuple(inputs)
    for tensor in inputs:
        check_input(model, tensor)
    explicit = emits_relevance(composite) and composite is not None

    def attempt():
        head = _output_head(model)
        captured = []
        hook = head.register_forward_pre_hook(lambda module, args: captured.append(args[0])) if head else None
        with Explainer(model, composite), torch.enable_grad(), frozen_parameters(model):
            x = embeds.detach().requires_grad_()
            leaves = [tensor.detach().requires_grad_() for tensor in inputs]
            try:
                # copies: model code may scale its input in place, which the leaves must not see
                logits = forward(model, x.clone(), answer + 1, *(leaf.clone() for leaf in leaves))
            finally:
                if hook is not None:
                    hook.remove()
            if logits.dim() != 3 or logits.shape[0] != 1 or logits.shape[1] < answer + 1:
                raise ValueError(f'the forward must return logits (1, tokens, vocabulary) with the last '
                                 f'{answer + 1} positions, got shape {tuple(logits.shape)}')
            # the logits each generated token was chosen from: positions prompt_length - 1 .. tokens - 2
            start = logits.shape[1] - answer - 1
            rows = logits[0, start:start + answer].detach()
            chosen = ids[prompt_length:].to(rows.device)
            scores = token_seeds(rows, chosen, target).sum(1)
            # gradient x input (no composite) backpropagates the gradient masks themselves
            seeds = token_seeds(rows, chosen, target, relevance=composite is not None)
            checks.ensure_finite(seeds, 'the output relevance seeds (the generated tokens\' logits)')
            log_probs = rows.float().log_softmax(1).gather(1, chosen[:, None])[:, 0]
            seed = torch.zeros_like(logits)
            seed[0, start:start + answer] = seeds

            def relevance_of(output, seed, retain):
                grads = torch.autograd.grad(output, [x] + leaves, seed, retain_graph=retain, allow_unused=True)
                values = [torch.zeros_like(leaf) if grad is None else grad if explicit else leaf.detach() * grad
                          for leaf, grad in zip([x] + leaves, grads)]
                return values[0].sum(-1)[0], values[1:]

            if not matrix:
                relevance, others = relevance_of(logits, seed, False)
                return relevance, None, scores, log_probs, [(other, None) for other in others]
            # The output head (a Linear, then element-wise maps such as soft-capping) works per position: one
            # backward through it gives every row's seed at its input, and each row's backward starts below it
            # (the vocabulary-wide matmul once, not once per generated token).
            hidden = captured[0] if len(captured) == 1 else None
            if hidden is not None and hidden.requires_grad and hidden.shape[:2] == logits.shape[:2]:
                output, seed = hidden, torch.autograd.grad(logits, hidden, seed, retain_graph=True)[0]
            else:
                output = logits
            table = torch.zeros(answer, ids.shape[0], dtype=embeds.dtype, device=embeds.device)
            tables = [torch.zeros(answer, *tensor.shape, dtype=tensor.dtype, device=tensor.device)
                      for tensor in inputs]
            row = torch.zeros_like(seed)
            for i in tqdm(range(answer), desc='generated tokens', disable=not progress, leave=False):
                row.zero_()
                row[0, start + i] = seed[0, start + i]
                table[i], others = relevance_of(output, row, i < answer - 1)
                for rows_of, other in zip(tables, others):
                    rows_of[i] = other
            return table.sum(0), table, scores, log_probs, [(rows_of.sum(0), rows_of) for rows_of in tables]

    relevance, table, scores, log_probs, others = checks.located(attempt)
    checks.ensure_finite(relevance, 'the token relevance (check the model and the stabilizers of the composite)')
    for other, _ in others:
        checks.ensure_finite(other, 'the relevance of an input besides the tokens')
    explanation = GenerationExplanation(ids, prompt_length, relevance.detach(), table, scores, log_probs, target)
    return explanation, [(other.detach(), None if rows_of is None else rows_of.detach()) for other, rows_of in others]
