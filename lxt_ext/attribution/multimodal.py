"""A vision-language model's generated text explained w.r.t. the image pixels and the prompt tokens, from one forward.

::

    from lxt_ext.attribution.multimodal import explain_vision_language
    from lxt_ext.composites import LanguageTransformer

    inputs = processor(images=image, text=prompt, return_tensors='pt')
    ids = model.generate(**inputs, max_new_tokens=16, do_sample=False)[0]         # prompt + answer
    e = explain_vision_language(model, ids, inputs['input_ids'].shape[1], inputs['pixel_values'],
                                LanguageTransformer(attention='cp'),
                                model_inputs={'image_grid_thw': inputs['image_grid_thw']})  # Qwen2-VL's grid
    e.heatmaps[0]        # (H, W) the first image's pixel relevance, summed over its channels
    e.relevance          # (tokens,) each token's relevance (zero at the image placeholders)

The model maps the pixels ``P`` (through its vision tower and projector, ``F``) and the token embeddings ``E`` to
logits; the image features replace the embeddings of the image placeholder tokens (transformers'
``masked_scatter``, a selection, linear), so the language model reads ``H = M * F(P) + (1 - M) * E`` with ``M`` the
placeholder mask. One forward over prompt + answer gives every generated token's logits (as
``lxt_ext.attribution.generation``, with its seeds ``targets.token_seeds``), and one backward of the seed gives

- ``R_P = P * dR/dP``: the pixel relevance, shaped like ``pixel_values``; its heatmap per image sums the channels
  (and Qwen2-VL's temporal copies) and puts each patch back at its place in the image;
- ``R_E = sum_d E * dR/dE``: each token's relevance; a placeholder's own embedding never reaches the output (the
  image features replace it), so its relevance is zero.

Under a conservative composite (``LanguageTransformer(attention='cp')``, biases, position tables and class tokens
zeroed) ``sum R_P + sum R_E`` is the explained logit: the image and the text share it.

Models are fed as transformers' ``generate`` feeds them, by family (``FAMILIES``, by ``config.model_type``):
LLaVA; Qwen2-VL and Qwen2.5-VL (flattened patches with ``image_grid_thw``; the multimodal rotary positions
computed from the ids, as generation computes them); PaliGemma (the prompt a bidirectional prefix:
``token_type_ids`` 0 over the prompt, 1 over the answer); Idefics3 and SmolVLM (pixel shuffle: a rearrangement,
linear); Gemma 3 (the image tokens attend to each other: ``token_type_ids`` 1 there). Another model is refused
unless a ``forward`` is given.
"""
from typing import NamedTuple

import torch

from ..errors import NotExplainableError
from .explainer import emits_relevance
from .generation import _default_forward, _token_ids, one_forward
from .targets import TOKEN_TARGETS

__all__ = ['VisionLanguageExplanation', 'explain_vision_language', 'image_heatmaps', 'model_inputs_for', 'FAMILIES',
           'TOKEN_TARGETS']


class VisionLanguageExplanation(NamedTuple):
    """What :func:`explain_vision_language` returns (a named tuple of these fields).

    Parameters
    ----------
    ids : torch.Tensor
        ``(tokens,)`` the prompt (image placeholders included) and the answer.
    prompt_length : int
        How many of ``ids`` are the prompt.
    relevance : torch.Tensor
        ``(tokens,)`` each token's embedding relevance for the whole answer (zero at the image placeholders and at
        the last token).
    matrix : torch.Tensor or None
        ``(answer, tokens)`` row ``i``: every token's relevance for generated token ``i``; None unless asked for.
    pixel_relevance : torch.Tensor
        Shaped like ``pixel_values``: each pixel value's relevance for the whole answer.
    pixel_matrix : torch.Tensor or None
        ``(answer, *pixel_values.shape)`` row ``i``: the pixel relevance for generated token ``i`` (its heatmaps:
        :func:`image_heatmaps`); None unless ``matrix``.
    heatmaps : list of torch.Tensor or None
        Per image a ``(height, width)`` map of ``pixel_relevance`` summed over the channels, in the image's pixel
        grid (None for a model of no known family, whose pixel layout is not known).
    image_tokens : torch.Tensor
        ``(tokens,)`` bool: the image placeholder tokens.
    scores : torch.Tensor
        ``(answer,)`` the value each generated token's seed explains: under a conservative composite the sum of
        its pixel and token relevance.
    log_probs : torch.Tensor
        ``(answer,)`` each generated token's log-probability.
    target : str
        What each generated token's seed explains (``'logit'``, ``'log_prob'``, ``'contrastive'``).
    """
    ids: torch.Tensor
    prompt_length: int
    relevance: torch.Tensor
    matrix: object
    pixel_relevance: torch.Tensor
    pixel_matrix: object
    heatmaps: object
    image_tokens: torch.Tensor
    scores: torch.Tensor
    log_probs: torch.Tensor
    target: str


def _image_token(model):
    config = model.config
    for name in ('image_token_id', 'image_token_index'):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


# -- families: the inputs generation gives the model besides ids and pixels, and the pixel layout ----------------

def _no_inputs(model, ids, prompt_length, given):
    return {}


def _rope_positions(model, ids, prompt_length, given):
    """Qwen2-VL's multimodal rotary positions (3, 1, tokens), as ``generate`` computes them from the ids: the model
    called with embeddings alone would number the tokens 0, 1, 2, ... instead (or reuse the last call's offsets)."""
    if given.get('image_grid_thw') is None:
        raise ValueError(f'{type(model).__name__} needs model_inputs={{"image_grid_thw": ...}} (the processor '
                         f'returns it with the flattened patches)')
    if given.get('position_ids') is not None:
        return {}
    types = given.get('mm_token_type_ids')
    if types is None:
        types = (ids == _image_token(model)).int()[None]
    inner = getattr(model, 'model', model)
    positions, _ = inner.get_rope_index(ids[None], mm_token_type_ids=types, image_grid_thw=given['image_grid_thw'],
                                        attention_mask=given.get('attention_mask'))
    return {'position_ids': positions}


def _prefix_types(model, ids, prompt_length, given):
    """PaliGemma: the prompt (image and prefix text) is one bidirectional block in generation's first step, the
    answer causal after it: ``token_type_ids`` 0 over the prompt, 1 over the answer."""
    if given.get('token_type_ids') is not None:
        return {}
    types = torch.ones_like(ids)
    types[:prompt_length] = 0
    return {'token_type_ids': types[None]}


def _image_types(model, ids, prompt_length, given):
    """Gemma 3: the image tokens attend to each other bidirectionally (``token_type_ids`` 1 there)."""
    if given.get('token_type_ids') is not None:
        return {}
    return {'token_type_ids': (ids == _image_token(model)).long()[None]}


def _channel_maps(model, relevance, given):
    """``(images, channels, H, W)`` or ``(batch, images, channels, H, W)`` pixels: each image's channels summed."""
    if relevance.dim() == 5:
        relevance = relevance.flatten(0, 1)
    if relevance.dim() != 4:
        raise ValueError(f'expected pixel values (images, channels, height, width) or (batch, images, channels, '
                         f'height, width), got shape {tuple(relevance.shape)}')
    return list(relevance.sum(1).unbind(0))


def _patch_maps(model, relevance, given):
    """Qwen2-VL's flattened patches back in the image grid: rows ``(t, h / m, w / m, m, m)`` and columns ``(channels,
    temporal copies, p, p)`` (its image processor's layout; ``p`` the patch size, ``m`` the merge size), summed over
    the channels, the temporal copies and the frames."""
    vision = model.config.vision_config
    p, m, copies = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    grid = given.get('image_grid_thw')
    if grid is None:
        raise ValueError('the heatmaps of flattened patches need model_inputs={"image_grid_thw": ...}')
    grid = torch.as_tensor(grid).reshape(-1, 3)
    sizes = grid.prod(-1).tolist()
    if sum(sizes) != relevance.shape[0]:
        raise ValueError(f'image_grid_thw {grid.tolist()} gives {sum(sizes)} patches, pixel_values has '
                         f'{relevance.shape[0]}')
    maps = []
    for (t, h, w), patches in zip(grid.tolist(), relevance.split(sizes)):
        x = patches.reshape(t, h // m, w // m, m, m, -1, copies, p, p).sum((5, 6))
        maps.append(x.permute(0, 1, 3, 5, 2, 4, 6).reshape(t, h * p, w * p).sum(0))
    return maps


class Family(NamedTuple):
    """How a family of vision-language models is fed and how its pixels lie.

    Parameters
    ----------
    inputs : callable
        ``inputs(model, ids, prompt_length, model_inputs) -> dict``: the keyword inputs generation gives the model
        that the caller did not (positions, token types), over prompt + answer.
    heatmaps : callable
        ``heatmaps(model, pixel_relevance, model_inputs) -> list`` of ``(H, W)`` maps, one per image.
    """
    inputs: object
    heatmaps: object


FAMILIES = {
    'llava': Family(_no_inputs, _channel_maps),
    'qwen2_vl': Family(_rope_positions, _patch_maps),
    'qwen2_5_vl': Family(_rope_positions, _patch_maps),
    'paligemma': Family(_prefix_types, _channel_maps),
    'idefics3': Family(_no_inputs, _channel_maps),
    'smolvlm': Family(_no_inputs, _channel_maps),
    'gemma3': Family(_image_types, _channel_maps),
}


def _family(model):
    return FAMILIES.get(getattr(getattr(model, 'config', None), 'model_type', None))


# per-token inputs a processor gives for the prompt, and their value over the answer (text tokens, attended to)
_PER_TOKEN = {'attention_mask': 1, 'token_type_ids': 0, 'mm_token_type_ids': 0}
_ANSWER_TYPES = {'paligemma': 1}  # PaliGemma's answer: the causal suffix after the bidirectional prefix


def _over_answer(model, ids, prompt_length, given):
    """``given`` with its per-token inputs of the prompt's length (as the processor gives them) extended over the
    answer."""
    kind = getattr(getattr(model, 'config', None), 'model_type', None)
    extended = dict(given)
    for name, value in _PER_TOKEN.items():
        tensor = given.get(name)
        if isinstance(tensor, torch.Tensor) and tensor.dim() in (1, 2) and tensor.shape[-1] == prompt_length \
                and len(ids) > prompt_length:
            tensor = tensor.reshape(1, -1)
            fill = _ANSWER_TYPES.get(kind, value) if name == 'token_type_ids' else value
            answer = torch.full((1, len(ids) - prompt_length), fill, dtype=tensor.dtype, device=tensor.device)
            extended[name] = torch.cat([tensor, answer], 1)
    return extended


def model_inputs_for(model, ids, prompt_length, model_inputs=None):
    """The keyword inputs (besides ``inputs_embeds`` and ``pixel_values``) of the one forward over prompt + answer:
    ``model_inputs`` and what the model's family adds (``FAMILIES``); also for the forward over a prefix. Per-token
    inputs of the prompt's length (``attention_mask``, ``token_type_ids``, ``mm_token_type_ids`` as the processor
    gives them) are extended over the answer (1, the answer's token type, 0).

    Parameters
    ----------
    model : torch.nn.Module
        A vision-language model of a known family.
    ids : torch.Tensor
        ``(tokens,)`` the token ids.
    prompt_length : int
        How many of ``ids`` are the prompt.
    model_inputs : dict, optional
        The caller's (``image_grid_thw``, ``pixel_attention_mask``, ...).

    Returns
    -------
    dict
    """
    given = _over_answer(model, ids, prompt_length, dict(model_inputs or {}))
    family = _family(model)
    if family is None:
        return given
    return {**given, **family.inputs(model, ids, prompt_length, given)}


def image_heatmaps(model, pixel_relevance, model_inputs=None):
    """One ``(H, W)`` heatmap per image of ``pixel_relevance`` (shaped like the model's ``pixel_values``): the
    channels summed, each patch at its place in the image (Qwen2-VL's flattened patches unflattened with
    ``image_grid_thw`` and the vision config's patch, merge and temporal patch sizes).

    Parameters
    ----------
    model : torch.nn.Module
        The vision-language model.
    pixel_relevance : torch.Tensor
        E.g. ``VisionLanguageExplanation.pixel_relevance`` or a row of its ``pixel_matrix``.
    model_inputs : dict, optional
        The model's inputs (``image_grid_thw`` for Qwen2-VL).

    Returns
    -------
    list of torch.Tensor
    """
    family = _family(model)
    return (family.heatmaps if family else _channel_maps)(model, pixel_relevance, dict(model_inputs or {}))


def explain_vision_language(model, ids, prompt_length, pixel_values, composite, target='logit', matrix=False,
                            model_inputs=None, forward=None, progress=False):
    """The relevance of a generated (or given) continuation of a vision-language model w.r.t. the pixels and the
    prompt tokens, from one forward over prompt + answer.

    Parameters
    ----------
    model : torch.nn.Module
        transformers' ``...ForConditionalGeneration`` of a family in ``FAMILIES`` (or any model, with ``forward``).
    ids : torch.Tensor
        ``(tokens,)`` or ``(1, tokens)``: the prompt (with its image placeholder tokens, as the processor makes it)
        followed by the answer.
    prompt_length : int
        How many of ``ids`` are the prompt.
    pixel_values : torch.Tensor
        The processor's ``pixel_values`` (one sequence's images), in the model's dtype and on its device.
    composite : zennit.core.Composite or None
        ``LanguageTransformer(attention='attnlrp')`` or ``'cp'`` (relevance ``x * grad`` at both inputs); None:
        gradient x input. A composite whose first layer emits relevance is refused: it explains one input.
    target : {'logit', 'log_prob', 'contrastive'}
        What each generated token's seed explains (``lxt_ext.attribution.targets.token_seeds``).
    matrix : bool
        Also every generated token's own relevance (one backward per generated token; the pixel rows take
        ``answer`` times the memory of ``pixel_values``).
    model_inputs : dict, optional
        More inputs of the model (``image_grid_thw``, ``pixel_attention_mask``, ``attention_mask``, ...): the
        processor's output but ``input_ids`` and ``pixel_values``; per-token ones of the prompt's length are
        extended over the answer (:func:`model_inputs_for`). Floating tensors are refused (their relevance would
        be lost).
    forward : callable, optional
        ``forward(model, embeds, keep, pixel_values, **inputs) -> logits`` (as ``explain_generation``'s, with the
        pixels and the inputs); required for a model of no known family.
    progress : bool
        A progress bar over the matrix's rows.

    Returns
    -------
    VisionLanguageExplanation
    """
    if composite is not None and emits_relevance(composite):
        raise ValueError(f'{type(composite).__name__} has a first layer that emits relevance, for one input; a '
                         f'vision-language model has two (the pixels and the token embeddings): use '
                         f'LanguageTransformer(attention=...)')
    family = _family(model)
    if family is None and forward is None:
        kind = getattr(getattr(model, 'config', None), 'model_type', None)
        raise NotExplainableError(
            f'{type(model).__name__} (model type {kind!r}) is no vision-language family lxt_ext knows how to feed as '
            f'generation does ({", ".join(sorted(FAMILIES))}): pass forward=... (its positions, masks and token '
            f'types as its generate gives them)')
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        raise TypeError('pixel_values must be a floating tensor (the processor\'s pixel_values)')
    twice = sorted({'input_ids', 'inputs_embeds', 'pixel_values'} & set(model_inputs or {}))
    if twice:
        raise ValueError(f'model_inputs must not hold {twice}: the ids and pixel_values are arguments of their own')
    floating = [name for name, value in (model_inputs or {}).items()
                if isinstance(value, torch.Tensor) and value.is_floating_point()]
    if floating:
        raise NotExplainableError(
            f'model_inputs {floating}: floating inputs besides pixel_values (videos, audio, image embeddings) would '
            f'take relevance that is not returned; only pixel_values and the token embeddings are explained')
    ids, prompt_length = _token_ids(ids, prompt_length)
    token = _image_token(model)
    if token is not None and bool((ids[prompt_length:] == token).any()):
        raise ValueError(f'the answer holds the image token ({token}): the one forward would take it for an image '
                         f'placeholder, which generation did not (explain the answer up to it)')
    inputs = model_inputs_for(model, ids, prompt_length, model_inputs)
    user_forward = forward

    def run(model, embeds, keep, pixels):
        if user_forward is not None:
            return user_forward(model, embeds, keep, pixels, **inputs)
        return _default_forward(model, embeds, keep, pixel_values=pixels, **inputs)

    explanation, [(pixel_relevance, pixel_matrix)] = one_forward(
        model, ids, prompt_length, composite, target, matrix, run, progress=progress, inputs=(pixel_values,))
    image_tokens = ids == token if token is not None else torch.zeros_like(ids, dtype=torch.bool)
    heatmaps = family.heatmaps(model, pixel_relevance, inputs) if family else None
    g = explanation
    return VisionLanguageExplanation(g.ids, g.prompt_length, g.relevance, g.matrix, pixel_relevance, pixel_matrix,
                                     heatmaps, image_tokens.to(g.relevance.device), g.scores, g.log_probs, g.target)
