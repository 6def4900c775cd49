"""What is explained: targets become output seeds here, and only here.

The seed at the output is *relevance* (zennit's convention, which every lxt_ext composite keeps: a one-hot seed
gives input relevance summing to about 1, ``y * one_hot`` to the explained logit ``y``). lxt_ext's front door
seeds the explained logit, so relevance sums to it; without a composite (the plain gradient) the seed is the
one-hot, ``d y_t / d x``.

A target is one of:

- None: each row's top class; an int: that class for every row; an integer tensor ``(N,)``: one class per row.
  For ``(N, tokens, classes)`` outputs (language models) the class is at the last token.
- a floating tensor of the output's shape: the seed itself;
- a callable ``output -> seed`` (e.g. :func:`contrastive`).
"""
import torch

__all__ = ['scores_of', 'classes', 'class_seed', 'seed', 'contrastive', 'token_seeds', 'TOKEN_TARGETS', 'from_captum']


def scores_of(output):
    """The class scores of a model output: ``(N, classes)`` as they are, ``(N, tokens, classes)`` at the last token.

    Parameters
    ----------
    output : torch.Tensor
        The model output.

    Returns
    -------
    torch.Tensor
        ``(N, classes)``.
    """
    if output.dim() == 3:
        return output[:, -1]
    if output.dim() == 2:
        return output
    raise ValueError(f'a class target needs a (batch, classes) or (batch, tokens, classes) output, got shape '
                     f'{tuple(output.shape)}; pass a seed tensor or callable instead')


def classes(scores, target=None, top_k=None):
    """The explained class of every row of ``scores`` (``N * k`` rows with ``top_k``, copies consecutive).

    Parameters
    ----------
    scores : torch.Tensor
        ``(rows, classes)`` scores (:func:`scores_of`).
    target : None, int or torch.Tensor, optional
        None: each row's top class; an int: one class for all; an integer tensor ``(rows,)``: one per row.
    top_k : int, optional
        Each row's k top classes instead; the rows are k consecutive copies of each input, whose scores are
        identical.

    Returns
    -------
    torch.Tensor
        A LongTensor ``(rows,)``.
    """
    rows, width = scores.shape
    if top_k is not None:
        if target is not None:
            raise ValueError('give either target or top_k, not both')
        k = int(top_k)
        if not 1 <= k <= width:
            raise ValueError(f'top_k must be between 1 and the number of classes ({width}), got {top_k}')
        return scores[::k].topk(k, dim=1).indices.reshape(-1)
    if target is None:
        return scores.argmax(1)
    if isinstance(target, torch.Tensor):
        if target.dim() == 0:
            target = target.expand(rows)
        if target.shape != (rows,) or target.is_floating_point():
            raise ValueError(f'target must be an int or an integer tensor of shape ({rows},), '
                             f'got {target.dtype} of shape {tuple(target.shape)}')
        target = target.to(device=scores.device, dtype=torch.long)
    else:
        target = torch.full((rows,), int(target), dtype=torch.long, device=scores.device)
    if ((target < 0) | (target >= width)).any():
        raise ValueError(f'target classes must lie in 0..{width - 1}, got {target.tolist()}')
    return target


def class_seed(output, rows_classes, relevance=True):
    """The seed of one class per row: the class's output (``relevance``) or 1 there, 0 elsewhere.

    Parameters
    ----------
    output : torch.Tensor
        ``(N, classes)`` or ``(N, tokens, classes)`` (the class at the last token).
    rows_classes : torch.Tensor
        A LongTensor ``(N,)``.
    relevance : bool
        Seed the explained output (its relevance, zennit's convention) rather than the one-hot (a gradient).

    Returns
    -------
    torch.Tensor
        Shaped like ``output``.
    """
    output = output.detach()
    seed = torch.zeros_like(output)
    rows = torch.arange(output.shape[0], device=output.device)
    if output.dim() == 3:
        seed[rows, -1, rows_classes] = output[rows, -1, rows_classes] if relevance else 1
    else:
        seed[rows, rows_classes] = output[rows, rows_classes] if relevance else 1
    return seed


def seed(output, target=None, top_k=None, relevance=True):
    """The seed at ``output`` for ``target`` (see the module doc), and the explained classes.

    Parameters
    ----------
    output : torch.Tensor
        The model output.
    target : None, int, torch.Tensor or callable, optional
        What is explained (see the module doc).
    top_k : int, optional
        Each row's k top classes (rows are consecutive copies; see :func:`classes`).
    relevance : bool
        Class targets seed the explained output (relevance) rather than the one-hot (a gradient).

    Returns
    -------
    tuple of (torch.Tensor, torch.Tensor or None)
        The seed, shaped like ``output``, and the class of every row (None for a seed tensor or callable).
    """
    if callable(target):
        return target(output.detach()), None
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        if target.shape != output.shape:
            raise ValueError(f'target of shape {tuple(target.shape)} does not match the output {tuple(output.shape)}: '
                             f'give an int, an integer tensor of classes (one per row) or a seed of the output\'s '
                             f'shape')
        return target.to(device=output.device, dtype=output.dtype), None
    chosen = classes(scores_of(output.detach()), target, top_k)
    return class_seed(output, chosen, relevance), chosen


def contrastive(target=None, position=-1):
    """The contrastive seed of LXT's GPT-2 recipe, the chosen logit against all the others, as relevance.

    The gradient mask ``m`` is 1 at the chosen class ``t`` and ``-1 / (C - 1)`` at every other of the ``C``
    classes at the explained position (0 elsewhere), so it sums to zero; LXT's recipe writes ``-1 / C`` there,
    which scales the others' part by ``(C - 1) / C`` (0.99998 for GPT-2's vocabulary). Backpropagated as a
    gradient, ``m`` gives relevance summing to ``sum_j z_j m_j``; the seed is relevance here, so the callable
    returns ``z * m``: under a conservative composite (CP-LRP, biases zero) the input relevance sums to
    ``z_t - mean_{j != t} z_j``, what makes t more likely than the rest, not what raises every logit alike.

    Parameters
    ----------
    target : None, int or torch.Tensor, optional
        The chosen class: an int, a LongTensor ``(batch,)``, or None for each row's top class at ``position``.
    position : int
        The token of ``(batch, tokens, classes)`` outputs (default the last; other positions get 0).

    Returns
    -------
    callable
        ``output -> output * m`` for ``(batch, classes)`` or ``(batch, tokens, classes)`` outputs.
    """

    def contrast(output):
        if not isinstance(output, torch.Tensor) or output.dim() not in (2, 3):
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f'a contrastive target needs a (batch, classes) or (batch, tokens, classes) output, '
                             f'got {got}')
        scores = output[:, position] if output.dim() == 3 else output
        batch, width = scores.shape
        if width < 2:
            raise ValueError('a contrastive target needs at least two classes')
        if target is None:
            index = scores.argmax(-1)
        else:
            index = torch.as_tensor(target, device=output.device).long().expand(batch)
            if bool(((index < 0) | (index >= width)).any()):
                raise IndexError(f'target {target} out of range for {width} classes')
        rows = torch.full_like(scores, -1. / (width - 1))
        rows[torch.arange(batch, device=output.device), index] = 1.
        mask = torch.zeros_like(output)
        if output.dim() == 3:
            mask[:, position] = rows
        else:
            mask = rows
        return mask * output.detach()

    return contrast


TOKEN_TARGETS = ('logit', 'log_prob', 'contrastive')


def token_seeds(scores, tokens, kind='logit', relevance=True):
    """The seed rows that explain one chosen token per row of ``scores``, as relevance (``z * m``).

    ``m`` is the gradient seed of LXT's recipes, and the relevance seed ``z * m`` keeps their meaning: the input
    relevance sums to ``sum_j z_j m_j`` under a conservative composite (CP-LRP, biases zero).

    - ``'logit'``: ``m`` one-hot at the chosen token ``t``; the relevance sums to ``z_t``.
    - ``'log_prob'``: ``m = onehot(t) - softmax(z)``, the gradient of ``log softmax(z)_t``; the relevance sums to
      ``z_t - sum_j p_j z_j`` (what makes ``t`` more likely than the model's expectation).
    - ``'contrastive'``: ``m`` is 1 at ``t`` and ``-1 / (C - 1)`` elsewhere (:func:`contrastive`); the relevance
      sums to ``z_t - mean_{j != t} z_j``.

    Parameters
    ----------
    scores : torch.Tensor
        ``(rows, classes)`` logits, e.g. one row per generated token (the logits of the position before it).
    tokens : torch.Tensor
        ``(rows,)`` the chosen token of each row.
    kind : {'logit', 'log_prob', 'contrastive'}
        What each row explains.
    relevance : bool
        The relevance seed ``z * m`` (default), or the gradient seed ``m`` itself (gradient-based methods).

    Returns
    -------
    torch.Tensor
        ``(rows, classes)`` seeds; each row's sum is the value it explains.
    """
    if kind not in TOKEN_TARGETS:
        raise ValueError(f'the token target must be one of {TOKEN_TARGETS}, got {kind!r}')
    scores = scores.detach()
    rows, width = scores.shape
    tokens = torch.as_tensor(tokens, device=scores.device).long().reshape(-1)
    if tokens.shape != (rows,):
        raise ValueError(f'expected one token per row ({rows}), got shape {tuple(tokens.shape)}')
    if bool(((tokens < 0) | (tokens >= width)).any()):
        raise IndexError(f'tokens must lie in 0..{width - 1}, got {tokens.tolist()}')
    onehot = torch.zeros_like(scores).scatter_(1, tokens[:, None], 1.)
    if kind == 'logit':
        mask = onehot
    elif kind == 'log_prob':
        mask = onehot - scores.float().softmax(1).to(scores.dtype)
    else:
        if width < 2:
            raise ValueError('a contrastive target needs at least two classes')
        mask = onehot - (1 - onehot) / (width - 1)
    return mask * scores if relevance else mask


def from_captum(target, rows, device):
    """Captum's ``target`` (None, int, a sequence of ints or a tensor, one per row or one for all) as a target
    here; per-output-element tuples (for outputs beyond (N, classes)) are refused.

    Parameters
    ----------
    target : None, int, sequence or torch.Tensor
        Captum's target.
    rows : int
        The batch size.
    device : torch.device
        Where the classes go.

    Returns
    -------
    None, int or torch.Tensor
    """
    if target is None or isinstance(target, int):
        return target
    if isinstance(target, tuple) or (isinstance(target, list) and target and isinstance(target[0], tuple)):
        raise ValueError('tuple targets index outputs with more than two dimensions; LRP explains (N, classes) '
                         'logits: give an int, a list of ints or a tensor of classes')
    target = torch.as_tensor(target, device=device)
    if target.dim() == 0 or target.numel() == 1:
        return target.reshape(()).expand(rows)
    return target
