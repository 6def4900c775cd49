"""The errors by which lxt_ext refuses what it cannot explain exactly.

A wrong heatmap that looks right is the worst outcome of an attribution library, so every refusal, whether at
registration or at the first forward (before any relevance is returned), is a ``NotExplainableError``: one type
to catch for "lxt_ext cannot explain this model (or this layer) exactly", whatever found it.
"""

__all__ = ['NotExplainableError', 'UnmappedModuleError', 'UncoveredOperationError', 'UnsupportedLayerError']


class NotExplainableError(NotImplementedError):
    """lxt_ext cannot explain this model exactly; the message names what and what to do.

    A ``NotImplementedError`` (no rule for it is implemented), not a ``TypeError``: torch turns a ``TypeError``
    raised inside a Tensor operator into ``NotImplemented``, which would hide the message.
    """


class UnmappedModuleError(NotExplainableError):
    """A module the composite has no rule for, refused by name when the composite registers."""


class UncoveredOperationError(NotExplainableError):
    """An operation on the relevance path that no rule covers (its plain gradient is wrong relevance), found
    during the forward (``lxt_ext.operations``) or by ``lxt_ext.diagnostics.audit``."""


class UnsupportedLayerError(NotExplainableError, TypeError):
    """A fused rule was asked to take a module it has no product for (raised at registration; a ``TypeError``
    too, as it was before lxt_ext 0.4)."""
