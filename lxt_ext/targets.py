"""Output relevance seeds (what zennit's attributors take as ``attr_output``) beyond the one-hot class.

``contrastive(target)``: the contrastive seed of LXT's GPT-2 recipe, the chosen logit against all the
others. With ``C`` classes (vocabulary entries) at the explained position::

    seed[c] = 1            for the chosen class t
    seed[j] = -1 / (C - 1) for every other class j

as LXT backpropagates it (a gradient). The seed is relevance (zennit's convention, which lxt_ext's
composites keep), so the callable returns ``z * seed``, LXT's explanation under that reading: under a
conservative composite (CP-LRP, biases zero) the input relevance sums to ``z_t - mean_{j != t} z_j``, what
makes t more likely than the rest, not what raises every logit alike. Use it wherever a target seed is taken, e.g.::

    with GradientXInput(model, composite, forward=...) as attributor:
        logits, relevance = attributor(embeds, contrastive(token_id))
"""
import torch

__all__ = ['contrastive']


def contrastive(target=None, position=-1):
    """A callable ``output -> output * seed`` (the contrastive seed above, as relevance) for ``(batch, classes)`` outputs or
    ``(batch, tokens, classes)`` outputs at token ``position`` (default the last; other positions get
    0). ``target``: an int class, a LongTensor ``(batch,)`` of classes, or None for each row's top class
    at that position."""

    def seed(output):
        if not isinstance(output, torch.Tensor) or output.dim() not in (2, 3):
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f'a contrastive target needs a (batch, classes) or (batch, tokens, classes) output, '
                             f'got {got}')
        scores = output[:, position] if output.dim() == 3 else output
        batch, classes = scores.shape
        if classes < 2:
            raise ValueError('a contrastive target needs at least two classes')
        if target is None:
            index = scores.argmax(-1)
        else:
            index = torch.as_tensor(target, device=output.device).long().expand(batch)
            if bool(((index < 0) | (index >= classes)).any()):
                raise IndexError(f'target {target} out of range for {classes} classes')
        rows = torch.full_like(scores, -1. / (classes - 1))
        rows[torch.arange(batch, device=output.device), index] = 1.
        grad = torch.zeros_like(output)
        if output.dim() == 3:
            grad[:, position] = rows
        else:
            grad = rows
        return grad * output.detach()

    return seed
