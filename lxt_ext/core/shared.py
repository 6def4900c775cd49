"""What rules tell each other about the tensors of one forward pass (``SHARED``), never through attributes
written on tensors or module globals of their own."""
import collections
import threading
import weakref

import torch
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ['SharedTensors', 'SHARED']


class SharedTensors:
    """What rules tell each other about the tensors of a forward pass, per thread.

    - ``kept``: the inputs product rules most recently saved for backward (weakly, the last 8). A
      residual ``Sum``'s stacked input repeats the block input, which the block's first layer keeps:
      ``Norm`` on the sum saves a reference to that tensor instead of a copy (``kept_equal``).
    - ``recompute``: ``output -> (x, fn, version)`` for outputs ``fn(x)`` of identity-rule activations,
      whose rule keeps ``x`` anyway. A product rule consuming such an output unmodified since (same
      version) keeps ``x`` and recomputes ``fn(x)`` in backward: one activation-sized tensor less per MLP.

    Both only save memory, so under ``torch.compile`` they are off: dynamo cannot trace the weak
    containers (each rule would break the graph), and the relevance is the same either way.

    Parameters
    ----------
    size : int, optional
        How many kept inputs ``kept`` remembers per thread (default 8).
    """

    def __init__(self, size=8):
        self._size = size
        self._local = threading.local()

    def _state(self):
        state = self._local
        if not hasattr(state, 'kept'):
            state.kept = collections.deque(maxlen=self._size)
            state.recompute = WeakTensorKeyDictionary()
        return state

    def keep(self, tensor):
        if not torch.compiler.is_compiling():
            self._state().kept.append(weakref.ref(tensor))

    def kept_equal(self, tensor):
        """A tensor a product rule keeps anyway that is bitwise equal to ``tensor``, or None."""
        if torch.compiler.is_compiling():
            return None
        for ref in reversed(self._state().kept):
            kept = ref()
            if (kept is not None and kept.shape == tensor.shape and kept.dtype == tensor.dtype
                    and kept.device == tensor.device and torch.equal(kept, tensor)):
                return kept
        return None

    def mark_recomputable(self, output, x, fn):
        if not torch.compiler.is_compiling():
            self._state().recompute[output] = (x, fn, output._version)

    def recomputable(self, tensor):
        """``(x, fn)`` if ``tensor`` is ``fn(x)`` of an identity-rule activation, unmodified since; else None."""
        if torch.compiler.is_compiling():
            return None
        entry = self._state().recompute.get(tensor)
        if entry is None or entry[2] != tensor._version:
            return None
        return entry[:2]


#: The one :class:`SharedTensors` every lxt_ext rule reads and writes.
SHARED = SharedTensors()
