"""Attribution for models explained w.r.t. a tensor no rule emits relevance for (text models and
their input embeddings), and relevance at named layers.

Inside lxt_ext's transformer composites the gradient of a tensor carries relevance per unit of
it, so the relevance of any tensor t is ``t * grad(t)``: of the input embeddings, and of the
output of any module (latent relevance). ``GradientXInput`` is used the zennit way::

    composite = lxt_ext.composites.LanguageTransformer(attention='attnlrp')
    embeds = model.get_input_embeddings()(input_ids)
    with GradientXInput(model, composite, forward=lambda m, x: m(inputs_embeds=x).logits,
                        layers=['model.layers.0', 'model.layers.3.mlp']) as attributor:
        logits, relevance = attributor(embeds, target)       # relevance: embeds * grad
        attributor.latent['model.layers.3.mlp']               # that module's output * its grad

``target`` is what zennit's attributors take as ``attr_output``, the relevance of the output (zennit's
convention): a tensor of the output's shape, a callable ``output -> seed``, or, lxt_ext's shorthand, an
int class index (for a (batch, tokens, classes) output: the class at the last token), or None for the
top class (at the last token); the shorthands seed the explained logit there, so the input relevance
sums to it (up to what biases and stabilisers absorb).
"""
import contextlib

import torch

from . import checks


@contextlib.contextmanager
def frozen_parameters(model):
    """``model``'s parameters with ``requires_grad`` off inside, as they were after: relevance needs no
    weight gradients, and without them autograd keeps no layer inputs for them (a plain Linear keeps
    its weight only): less peak memory (docs/benchmarks_transformers.md, the language model)."""
    parameters = model.parameters() if isinstance(model, torch.nn.Module) else ()  # a plain function has none
    thawed = [parameter for parameter in parameters if parameter.requires_grad]
    for parameter in thawed:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in thawed:
            parameter.requires_grad_(True)


def emits_relevance(composite):
    """Whether the gradient w.r.t. the input is relevance itself (else relevance is ``x * grad``)."""
    from .composites.transformer import TransformerComposite

    if composite is None:
        return True  # the plain gradient is what is asked for
    return not isinstance(composite, TransformerComposite) or composite.explicit_first


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if hasattr(value, 'to_tuple'):
        return _first_tensor(value.to_tuple())
    return None


def seed(output, target):
    """The output relevance seed for ``target`` (see the module doc): the target's logit for the shorthands."""
    if callable(target):
        return target(output)
    if isinstance(target, torch.Tensor):
        if target.shape != output.shape:
            raise ValueError(f'target of shape {tuple(target.shape)} does not match the output {tuple(output.shape)}')
        return target.to(output.dtype)
    mask = torch.zeros_like(output)
    scores = output[:, -1] if output.dim() == 3 else output
    index = scores.argmax(-1) if target is None else torch.full(scores.shape[:1], int(target), device=output.device)
    rows = torch.arange(scores.shape[0], device=output.device)
    if output.dim() == 3:
        mask[rows, -1, index] = 1
    elif output.dim() == 2:
        mask[rows, index] = 1
    else:
        raise ValueError(f'an int target needs a (batch, classes) or (batch, tokens, classes) output, '
                         f'got shape {tuple(output.shape)}; pass a seed tensor or callable instead')
    return mask * output.detach()


class GradientXInput:
    """Registers ``composite`` on ``model`` while in use; ``attributor(x, target)`` returns the model
    output and ``x * grad(x)``; ``latent`` holds ``output * grad`` of each module named in ``layers``."""

    def __init__(self, model, composite, forward=None, layers=()):
        self.model = model
        self.composite = composite
        self.forward = forward or (lambda model, x: model(x))
        self.layers = list(layers)
        self.latent = {}
        modules = dict(model.named_modules())
        unknown = [name for name in self.layers if name not in modules]
        if unknown:
            raise KeyError(f'no modules named {unknown} in {type(model).__name__}')
        self._modules = {name: modules[name] for name in self.layers}

    def __enter__(self):
        self.composite.register(self.model)
        return self

    def __exit__(self, *exc):
        self.composite.remove()
        return False

    def _capture(self, name):
        def hook(module, args, output):
            tensor = _first_tensor(output)
            if tensor is None or not tensor.requires_grad:
                raise RuntimeError(f'latent relevance at {name!r}: its output is not a tensor that requires grad')
            self._outputs[name] = tensor
        return hook

    def __call__(self, input, target=None):
        """``(output, relevance)``; per-layer NaN/Inf checks as ``lxt_ext.checks.located`` runs them."""
        self._check_input(input)
        return checks.located(lambda: self._attribute(input, target))

    def _attribute(self, input, target):
        self._outputs = {}
        handles = [module.register_forward_hook(self._capture(name)) for name, module in self._modules.items()]
        try:
            with torch.enable_grad(), frozen_parameters(self.model):
                input = input.detach().requires_grad_()
                output = _first_tensor(self.forward(self.model, input))
                if output is None:
                    raise TypeError('the forward function must return a tensor (e.g. the logits)')
                names = list(self._outputs)
                tensors = [input] + [self._outputs[name] for name in names]
                try:
                    grad_output = checks.ensure_finite(seed(output, target), 'the output relevance seed (target)')
                    grads = torch.autograd.grad(output, tensors, grad_output, allow_unused=True)
                except RuntimeError as error:
                    if 'use_reentrant' not in str(error):
                        raise
                    raise RuntimeError(
                        'the model uses reentrant activation checkpointing, which cannot give the gradient of an '
                        'input; enable it as non-reentrant, e.g. for transformers '
                        "model.activation_checkpointing_enable({'use_reentrant': False})") from error
        finally:
            for handle in handles:
                handle.remove()
        self.latent = {
            name: (tensor * grad).detach() if grad is not None else torch.zeros_like(tensor)
            for name, tensor, grad in zip(names, tensors[1:], grads[1:])
        }
        if grads[0] is None:
            relevance = torch.zeros_like(input)
        else:
            relevance = grads[0] if emits_relevance(self.composite) else input.detach() * grads[0]
        checks.ensure_finite(relevance, 'the input relevance (check the model and the stabilizers of the composite)')
        return output.detach(), relevance.detach()

    def _check_input(self, input):
        if not isinstance(input, torch.Tensor) or not input.is_floating_point():
            raise TypeError(f'GradientXInput explains a floating tensor input (e.g. input embeddings), '
                            f'got {type(input).__name__ if not isinstance(input, torch.Tensor) else input.dtype}')
        parameter = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        if parameter is not None and input.device != parameter.device:
            raise ValueError(f'the input is on {input.device} but {type(self.model).__name__} is on {parameter.device}')
        if parameter is not None and input.dtype != parameter.dtype:
            raise TypeError(f'the input dtype {input.dtype} differs from the dtype {parameter.dtype} of '
                            f'{type(self.model).__name__}\'s parameters')
        checks.ensure_finite(input, 'the input')

