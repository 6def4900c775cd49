"""Attribution baselines to compare the LRP composites against, each
``method(model, x, target, forward=None) -> relevance shaped like x``.

``x`` is the model's input batch (already normalised), ``target`` a LongTensor (N,) of the classes
to explain (one per row), ``forward(model, x) -> logits`` how to call the model (default ``model(x)``;
an output with a ``.logits`` attribute, as Hugging Face models return, is unwrapped). The model is
left in the mode it is in (call ``model.eval()`` first). The explained quantity is the target logit
``f_t(x)`` of each row; rows are independent, so one backward of the sum of the rows' logits gives
every row's gradient.
"""
import torch

__all__ = ['gradient', 'gradient_x_input']


def logits_of(output):
    """The logits tensor of a model output (a tensor, or an object with ``.logits``)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, 'logits', None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f'the model returned {type(output).__name__}, not a logits tensor nor an object with '
                    f'.logits; pass forward=lambda model, x: <logits>')


def _call(model, x, forward):
    return logits_of(model(x) if forward is None else forward(model, x))


def _check(x, target):
    if not isinstance(target, torch.Tensor) or target.dtype != torch.long or target.shape != x.shape[:1]:
        raise ValueError(f'target must be a LongTensor of shape ({x.shape[0]},) (one class per row), got '
                         f'{target.dtype if isinstance(target, torch.Tensor) else type(target).__name__} '
                         f'{tuple(target.shape) if isinstance(target, torch.Tensor) else ""}'.rstrip())
    return target.to(x.device)


def _one_hot(target):
    """zennit's ``attr_output``: the one-hot seed of each row's target class."""
    return lambda output: torch.nn.functional.one_hot(target, logits_of(output).shape[-1]).to(logits_of(output).dtype)


def gradient(model, x, target, forward=None):
    """Saliency: ``d f_t(x) / d x``."""
    target = _check(x, target)
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        logits = _call(model, x, forward)
        (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x)
    return grad


def gradient_x_input(model, x, target, forward=None):
    """Gradient x Input: ``x * d f_t(x) / d x`` (for a bias-free ReLU network it sums to ``f_t(x)``)."""
    return x.detach() * gradient(model, x, target, forward)
