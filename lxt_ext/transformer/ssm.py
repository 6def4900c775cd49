"""Selective state-space models (Mamba) in the Gradient x Input convention: MambaLRP's rule on the scan.

A Mamba mixer computes ``h_t = A_t h_{t-1} + B_t x_t``, ``y_t = C_t h_t + D x_t`` with ``A_t = exp(dt_t A)``,
``B_t = dt_t B(x)`` and ``C_t = C(x)`` computed from the input. MambaLRP (Jafari et al., NeurIPS 2024, arXiv
2406.07592) holds the input-dependent coefficients ``A_t, B_t, C_t`` constant in backward, so that the scan is
linear in ``x`` and its plain gradient conserves relevance, as CP-LRP holds the attention weights constant; its
SiLU rule is the identity rule and its RMSNorm rule the statistics held constant, which the composites give
anyway. ``SelectiveSSM`` makes the tensors every coefficient derives from constants while registered:

- Mamba-1 form (``x_proj``): the output of ``x_proj`` (``dt``, ``B`` and ``C``);
- Mamba-2 form (``in_proj`` giving ``z``, ``xBC`` and ``dt``; transformers' Mamba2, Bamba, Falcon-H1, Zamba2,
  Nemotron-H, GraniteMoeHybrid): ``dt`` where the mixer splits ``in_proj``'s output, ``B`` and ``C`` where it
  splits the convolution's output (found by the split sizes, which the mixer's attributes give).

The rest of the mixer (the gate ``y * silu(z)``, the convolution, the gated norm, the projections) gets the rules
of its modules and operations.
"""
import torch
from torch.overrides import TorchFunctionMode

from ..core import RuleHook
from ..errors import NotExplainableError

__all__ = ['SelectiveSSM']

_MAMBA2 = ('in_proj', 'intermediate_size', 'conv_dim', 'num_heads', 'n_groups', 'ssm_state_size')


class _Coefficients(TorchFunctionMode):
    """Detaches what the Mamba-2 splits give for ``dt`` (the last of ``in_proj``'s pieces) and ``B``, ``C`` (the
    last two of the convolution's) during one forward of ``mixer``; ``found`` records which splits it saw."""

    def __init__(self, mixer):
        super().__init__()
        state = mixer.n_groups * mixer.ssm_state_size
        self.projection = [mixer.intermediate_size, mixer.conv_dim, mixer.num_heads]
        self.convolution = [mixer.intermediate_size, state, state]
        self.found = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if getattr(func, '__name__', '') != 'split':
            return output
        sizes = args[1] if len(args) > 1 else kwargs.get('split_size', kwargs.get('split_size_or_sections'))
        sizes = list(sizes) if isinstance(sizes, (list, tuple)) else None
        if sizes == self.projection:
            self.found.add('dt')
            return (*output[:2], output[2].detach())
        if sizes == self.convolution:
            self.found.add('B, C')
            return (output[0], output[1].detach(), output[2].detach())
        return output


class SelectiveSSM(RuleHook):
    """MambaLRP's rule on a Mamba mixer (see the module doc): the tensors the scan's coefficients derive from are
    detached while the rule wants relevance. The mixer's own operations are left to the operation rules
    (``covers_operations = False``).

    Parameters
    ----------
    parameters : str, optional
        Mamba-1 form: the attribute name of the child projecting the input to ``dt``, ``B`` and ``C`` (default
        ``'x_proj'``); a mixer without it is taken in the Mamba-2 form.
    """
    covers_operations = False
    checked = False

    def __init__(self, parameters='x_proj'):
        super().__init__()
        self.parameters = parameters
        self._handle = None

    @staticmethod
    def takes(module):
        """Whether ``module`` is a mixer of a form this rule takes (Mamba-1 with ``x_proj`` and ``dt_proj``, or
        Mamba-2 with the attributes its splits are sized by)."""
        return (hasattr(module, 'x_proj') and hasattr(module, 'dt_proj')) or all(hasattr(module, a) for a in _MAMBA2)

    def prepare(self, module):
        if not hasattr(module, self.parameters) and not all(hasattr(module, a) for a in _MAMBA2):
            raise NotExplainableError(
                f'{type(module).__name__} has neither {self.parameters!r} (Mamba-1) nor {", ".join(_MAMBA2)} '
                f'(Mamba-2): not a Mamba mixer this rule takes')

    def attach(self, module):
        hook = self
        if hasattr(module, self.parameters):
            def constant(child, args, output):
                return output.detach() if hook.wants_relevance(output) else output

            self._handle = getattr(module, self.parameters).register_forward_hook(constant)
            return
        inner = module.forward

        def forward(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]  # Bamba passes keywords
            if not (hook.wants_relevance(*tensors) and torch.is_grad_enabled()):
                return inner(*args, **kwargs)
            with _Coefficients(module) as coefficients:
                output = inner(*args, **kwargs)
            if coefficients.found != {'dt', 'B, C'}:
                raise NotExplainableError(
                    f'{type(module).__name__}: its forward did not split in_proj\'s output into z, xBC, dt and the '
                    f'convolution\'s into x, B, C as the Mamba-2 form does (found: {sorted(coefficients.found)}), '
                    f'so MambaLRP\'s rule cannot hold the scan\'s coefficients constant')
            return output

        self.swap_forward(module, forward)

    def detach(self, module):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
