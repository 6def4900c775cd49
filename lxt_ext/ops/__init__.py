"""The registered ops ``torch.ops.lxt_ext.*``: the compiled extension, the constants it defines, and the
fake (meta) kernels that let ``torch.compile`` and ``torch.library.opcheck`` see through the ops.

``lib.<name>`` is ``torch.ops.lxt_ext.<name>``. ``RULES`` (rule name -> code of ``lrp_backward``'s
``rule`` argument), ``ATTENTION_MODES`` (mode name -> code of ``attention_backward``'s ``mode``) and
``ATTNLRP_FACTORS`` (AttnLRP's factors on the exact attention gradient, ``'value'`` for dV and ``'query_key'`` for
dQ and dK, and the uniform rule's ``'uniform_share'`` they derive from; csrc/attention/math.h) are defined once,
in C++ (csrc/), and read from the extension here. ``attention_mode(name)`` validates an attention mode.
"""
import torch

from .. import _C
from . import fake  # noqa: F401  (registers the fake kernels)

lib = torch.ops.lxt_ext
cuda_built = _C.cuda_built
kernel_threads = _C.kernel_threads
RULES = _C.rule_codes()
ATTENTION_MODES = _C.attention_modes()
ATTNLRP_FACTORS = _C.attnlrp_factors()


def attention_mode(name, argument='attention'):
    """The code of the attention mode ``name`` (``'attnlrp'``: AttnLRP, ``'cp'``: CP-LRP), the one check of the
    attention rule wherever a user passes it.

    Parameters
    ----------
    name : str
        A key of ``ATTENTION_MODES``.
    argument : str
        The argument's name in the error message.

    Returns
    -------
    int
        The code ``attention_backward`` takes.
    """
    if not isinstance(name, str) or name not in ATTENTION_MODES:
        raise ValueError(f'{argument} must be one of {tuple(ATTENTION_MODES)}, got {name!r}')
    return ATTENTION_MODES[name]


def has_kernels(tensor):
    """Whether this build has kernels for ``tensor``'s device (the CPU; CUDA when built with it); meta and fake
    tensors count as such, as the fake kernels cover them."""
    kind = tensor.device.type
    return kind in ('cpu', 'meta') or (kind == 'cuda' and cuda_built)


def identity_backward(output, input, grad, stabilizer):
    """``grad * output / stab(input)``, ``stab(z) = z + eps * (sign(z) + [z == 0])`` (zennit's stabilize): the
    identity rule's backward, and with ``output = input = y`` epsilon's ``g y / stab(y)``. One pass of the
    extension op where this build has kernels for the device; elsewhere the same in tensor ops (in float32 for
    half types, as the kernels compute), so every device gets one definition."""
    if has_kernels(input):
        return lib.identity_backward(output, input, grad.to(input.dtype), stabilizer)
    x = input.to(torch.promote_types(input.dtype, torch.float32))
    ratio = output.to(x.dtype) / x.sign().add_(x == 0).mul_(stabilizer).add_(x)
    return ratio.mul_(grad).to(input.dtype)
