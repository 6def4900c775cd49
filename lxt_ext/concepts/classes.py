"""Concepts of token-major layers for zennit-crp: hidden channels and MLP neurons (:class:`HiddenConcept`),
attention heads (:class:`HeadConcept`)."""
import numpy as np
import torch
from crp.concepts import Concept

__all__ = ['HiddenConcept', 'HeadConcept']

def _normed(relevance, abs_norm):
    return relevance / (relevance.abs().sum(-1, keepdim=True) + 1e-10) if abs_norm else relevance


def _units(channels, size):
    if channels % size:
        raise ValueError(f'{channels} channels are not whole heads of {size}')
    return channels // size


def _keep_units(grad, batch_id, units, size):
    """``grad`` with row ``batch_id`` kept only at ``units`` (groups of ``size`` channels of the last dimension)."""
    mask = torch.zeros(_units(grad.shape[-1], size), size, dtype=grad.dtype, device=grad.device)
    mask[units] = 1
    grad[batch_id] = grad[batch_id] * mask.flatten()
    return grad


def _keep_units_at(grad, batch_id, units_tokens, size):
    """``grad`` with row ``batch_id`` kept only at each unit's tokens (``units_tokens``: unit -> token indices,
    over the flattened dimensions between batch and channels)."""
    row = grad[batch_id]
    mask = torch.zeros(_units(row.shape[-1], size), row[..., 0].numel(), dtype=grad.dtype, device=grad.device)
    for unit, tokens in units_tokens.items():
        mask[unit, tokens] = 1
    grad[batch_id] = row * mask.T.repeat_interleave(size, dim=-1).reshape(row.shape)
    return grad


class HiddenConcept(Concept):
    """Hidden channels of a token-major layer output ``(batch, tokens, hidden)`` (a block's output, the
    residual stream) or the neurons of an MLP (``(batch, tokens, intermediate)``): concept ``c`` is index ``c``
    of the LAST dimension, at every token. zennit-crp's ``ChannelConcept`` masks dimension 1 instead, the
    tokens there."""

    @staticmethod
    def mask(batch_id, concept_ids, layer_name=None):
        """A gradient mask (zennit-crp's ``mask_map`` signature): row ``batch_id`` keeps channels
        ``concept_ids`` of the last dimension, at every token.

        Parameters
        ----------
        batch_id : int
            The row of the batch the condition belongs to.
        concept_ids : list of int
            The channels kept.
        layer_name : str, optional
            Unused (zennit-crp passes it).

        Returns
        -------
        callable
            ``grad -> grad`` with the other channels of row ``batch_id`` zeroed.
        """
        return lambda grad: _keep_units(grad, batch_id, concept_ids, 1)

    @staticmethod
    def mask_rf(batch_id, c_n_map, layer_name=None):
        """A gradient mask of channels at given tokens: ``c_n_map`` maps a channel to the token indices kept
        (over the flattened dimensions between batch and channel, the tokens of a ``(batch, tokens, hidden)``
        output).

        Parameters
        ----------
        batch_id : int
            The row of the batch the condition belongs to.
        c_n_map : dict of int to list of int
            Channel -> the tokens where it is kept.
        layer_name : str, optional
            Unused (zennit-crp passes it).

        Returns
        -------
        callable
            ``grad -> grad`` with everything else of row ``batch_id`` zeroed.
        """
        return lambda grad: _keep_units_at(grad, batch_id, c_n_map, 1)

    def attribute(self, relevance, mask=None, layer_name=None, abs_norm=True):
        """The relevance of each channel: summed over the tokens (every dimension between batch and channel).

        Parameters
        ----------
        relevance : torch.Tensor
            A layer's relevance, ``(batch, ..., channels)``.
        mask : torch.Tensor, optional
            Multiplies ``relevance`` first.
        layer_name : str, optional
            Unused (zennit-crp passes it).
        abs_norm : bool, optional
            Divide each row by its summed absolute value (default True, as zennit-crp).

        Returns
        -------
        torch.Tensor
            ``(batch, channels)``.
        """
        if isinstance(mask, torch.Tensor):
            relevance = relevance * mask
        return _normed(relevance.reshape(relevance.shape[0], -1, relevance.shape[-1]).sum(1), abs_norm)

    def _per_token(self, relevance):
        """``(batch, tokens, units)``: the tokens flattened (every dimension between batch and channel)."""
        return relevance.reshape(relevance.shape[0], -1, relevance.shape[-1])

    def reference_sampling(self, relevance, layer_name=None, max_target='sum', abs_norm=True):
        """The samples of a batch ranked per unit (zennit-crp's reference sampling, run by its
        ``Maximization`` for relevances and activations alike): a unit's value per sample is summed over the
        tokens (``'sum'``) or its largest token (``'max'``), divided by the sample's summed absolute value over
        the units when ``abs_norm``; its "receptive field" is the token of its largest value.

        Parameters
        ----------
        relevance : torch.Tensor
            A layer's relevance (or activation), ``(batch, ..., channels)``.
        layer_name : str, optional
            Unused (zennit-crp passes it).
        max_target : {'sum', 'max'}, optional
            The unit's value per sample (default ``'sum'``).
        abs_norm : bool, optional
            The normalisation (default True, as zennit-crp).

        Returns
        -------
        tuple of torch.Tensor
            ``(batch_sorted, values_sorted, tokens_sorted)``, each ``(batch, units)``: per unit the batch rows
            in descending order of value, the values, the token of the unit's largest value in that row.
        """
        per_token = self._per_token(relevance)
        token = per_token.argmax(1)
        if max_target == 'sum':
            value = per_token.sum(1)
        elif max_target == 'max':
            value = per_token.gather(1, token[:, None]).squeeze(1)
        else:
            raise ValueError("'max_target' supports only 'max' or 'sum'.")
        value = _normed(value, abs_norm)
        order = torch.argsort(value, dim=0, descending=True)
        return order, value.gather(0, order), token.gather(0, order)

    def get_rf_indices(self, output_shape, layer_name=None):
        """The "receptive fields" of a unit: its tokens.

        Parameters
        ----------
        output_shape : tuple of int
            The layer's output shape of one sample, ``(..., channels)``.
        layer_name : str, optional
            Unused.

        Returns
        -------
        numpy.ndarray
            ``0 .. tokens - 1`` (the flattened dimensions before the channels).
        """
        return np.arange(int(np.prod(output_shape[:-1])) if len(output_shape) > 1 else 1)


class HeadConcept(HiddenConcept):
    """Attention heads at the input of the attention's output projection, ``(batch, tokens, heads * head_dim)``
    (the heads' outputs concatenated, as transformers' ``o_proj``/``c_proj`` and ``nn.MultiheadAttention``'s
    ``out_proj`` take them): concept ``h`` is channels ``h * head_dim .. (h + 1) * head_dim - 1``.

    Parameters
    ----------
    head_dim : int
        The channels of one head.
    """

    def __init__(self, head_dim):
        self.head_dim = int(head_dim)

    def _heads(self, channels):
        return _units(channels, self.head_dim)

    def mask(self, batch_id, concept_ids, layer_name=None):
        """A gradient mask: row ``batch_id`` keeps heads ``concept_ids``, at every token.

        Parameters
        ----------
        batch_id : int
            The row of the batch the condition belongs to.
        concept_ids : list of int
            The heads kept.
        layer_name : str, optional
            Unused (zennit-crp passes it).

        Returns
        -------
        callable
            ``grad -> grad`` with the other heads of row ``batch_id`` zeroed.
        """
        return lambda grad: _keep_units(grad, batch_id, concept_ids, self.head_dim)

    def mask_rf(self, batch_id, c_n_map, layer_name=None):
        """A gradient mask of heads at given tokens: ``c_n_map`` maps a head to the token indices kept.

        Parameters
        ----------
        batch_id : int
            The row of the batch the condition belongs to.
        c_n_map : dict of int to list of int
            Head -> the tokens where it is kept.
        layer_name : str, optional
            Unused (zennit-crp passes it).

        Returns
        -------
        callable
            ``grad -> grad`` with everything else of row ``batch_id`` zeroed.
        """
        return lambda grad: _keep_units_at(grad, batch_id, c_n_map, self.head_dim)

    def _per_token(self, relevance):
        """``(batch, tokens, heads)``: each head's channels summed."""
        per_token = super()._per_token(relevance)
        return per_token.reshape(*per_token.shape[:2], self._heads(per_token.shape[-1]), self.head_dim).sum(-1)

    def attribute(self, relevance, mask=None, layer_name=None, abs_norm=True):
        """The relevance of each head: summed over its channels and the tokens.

        Parameters
        ----------
        relevance : torch.Tensor
            The relevance of the output projection's input, ``(batch, ..., heads * head_dim)``.
        mask : torch.Tensor, optional
            Multiplies ``relevance`` first.
        layer_name : str, optional
            Unused (zennit-crp passes it).
        abs_norm : bool, optional
            Divide each row by its summed absolute value (default True, as zennit-crp).

        Returns
        -------
        torch.Tensor
            ``(batch, heads)``.
        """
        channels = super().attribute(relevance, mask, layer_name, abs_norm=False)
        heads = channels.reshape(channels.shape[0], self._heads(channels.shape[-1]), self.head_dim).sum(-1)
        return _normed(heads, abs_norm)
