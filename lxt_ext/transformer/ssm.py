"""Selective state-space models (Mamba) in the Gradient x Input convention: MambaLRP's rule on the scan.

A Mamba mixer computes ``h_t = A_t h_{t-1} + B_t x_t``, ``y_t = C_t h_t + D x_t`` with ``A_t = exp(dt_t A)``,
``B_t = dt_t B(x)`` and ``C_t = C(x)`` computed from the input (``dt, B, C = x_proj(x)``). MambaLRP (Jafari et al.,
NeurIPS 2024, arXiv 2406.07592) holds the input-dependent coefficients ``A_t, B_t, C_t`` constant in backward, so
that the scan is linear in ``x`` and its plain gradient conserves relevance, as CP-LRP holds the attention weights
constant; its SiLU rule is the identity rule and its RMSNorm rule the statistics held constant, which the
composites give anyway. ``SelectiveSSM`` makes ``x_proj``'s output (every coefficient derives from it) a constant
while registered; the rest of the mixer (the gate ``y * silu(z)``, the convolution, the projections) gets the
rules of its modules and operations.
"""
from ..core import RuleHook

__all__ = ['SelectiveSSM']


class SelectiveSSM(RuleHook):
    """MambaLRP's rule on a Mamba (Mamba-1 form) mixer: the output of its child ``parameters`` (the projection
    computing ``dt``, ``B`` and ``C``) is detached while the rule wants relevance, so the scan's coefficients are
    constants. The mixer's own operations are left to the operation rules (``covers_operations = False``).

    Parameters
    ----------
    parameters : str, optional
        The attribute name of the child projecting the input to ``dt``, ``B`` and ``C`` (default ``'x_proj'``).
    """
    covers_operations = False
    checked = False

    def __init__(self, parameters='x_proj'):
        super().__init__()
        self.parameters = parameters
        self._handle = None

    def prepare(self, module):
        if not hasattr(module, self.parameters):
            raise TypeError(f'{type(module).__name__} has no {self.parameters!r}: not a Mamba mixer this rule takes')

    def attach(self, module):
        hook = self

        def constant(child, args, output):
            return output.detach() if hook.wants_relevance(output) else output

        self._handle = getattr(module, self.parameters).register_forward_hook(constant)

    def detach(self, module):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
