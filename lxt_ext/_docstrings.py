"""numpydoc entries of parameters many public names share, written once (the API reference shows them in full).

``@shared_parameters('rule_stabilizer', 'rule_zero_params')`` adds those entries to the decorated object's
Parameters section: at its end, or at its start with ``leading=True``.
"""
import inspect
import re

ENTRIES = {
    'rule_stabilizer': """stabilizer : float or zennit.core.Stabilizer, optional
    The stabilizer of the denominators, ``stab(z) = z + stabilizer * (sign(z) + [z == 0])`` as in zennit
    (default 1e-6). A ``zennit.core.Stabilizer`` with ``clip`` or ``norm_scale`` is refused.""",
    'rule_zero_params': """zero_params : str or list of str, optional
    zennit's parameters to zero for the rule: only ``'bias'`` (the bias enters neither denominator); another
    name raises ``NotImplementedError``.""",
    'convention': """convention : {'explicit', 'gradient_x_input'}, optional
    Keyword only. ``'explicit'`` (default): the gradient slot carries relevance, as in zennit.
    ``'gradient_x_input'``: it carries relevance per unit of the tensor (``R = y * g``), the form lxt_ext's
    transformer composites register.""",
    'composite_epsilon': """epsilon : float, optional
    The epsilon of the fused epsilon rule on Linear layers (default 1e-6).""",
    'composite_stabilizer': """stabilizer : float, optional
    The stabilizer of the composite's other product rules (and of Flat or ZBox on the first layer), and of
    ``Norm`` on sums and average pooling (default 1e-6).""",
    'layer_map': """layer_map : list of (type, zennit.core.Hook), optional
    Rules placed before the composite's own layer map (the first match wins), as in zennit.""",
    'first_map': """first_map : list of (type, zennit.core.Hook), optional
    Rules for the first layer, before the composite's own first-layer rule, as in zennit.""",
    'composite_zero_params': """zero_params : str or list of str, optional
    ``'bias'`` to leave the bias out of every product rule (zennit's ``zero_params``).""",
    'tokens': """tokens : sequence of str
    The tokenizer's strings, e.g. ``tokenizer.convert_ids_to_tokens(ids)``.""",
    'token_relevance': """relevance : array_like
    One finite value per token (1-D; sum input-embedding relevance over its last dimension first).""",
    'words': """words : bool, optional
    Merge tokens into words, their relevance summed (default False).""",
    'scheme': """scheme : {'auto', 'byte_level', 'sentencepiece', 'wordpiece', 'plain'}, optional
    How tokens are turned into text (default ``'auto'``, see ``lxt_ext.visualization.tokens.clean_tokens``).""",
    'canonizers': """canonizers : list of zennit.canonizers.Canonizer, optional
    zennit's canonizers; BatchNorms that a ``MergeBatchNorm`` canonizer merges are folded into the layer's
    rule (``BatchNormFolding``).""",
    # lxt_ext's transformer rules and composites (Gradient x Input convention)
    'attention': """attention : {'attnlrp', 'cp'}, optional
    The attention rule: ``'attnlrp'`` (AttnLRP: the uniform rule on the attention's matrix products, the
    softmax rule) or ``'cp'`` (CP-LRP: the attention weights held constant); a composite's also decides the
    gated products' rule (``lxt_ext.transformer.mlp``).""",
    'gated_attention': """attention : {'attnlrp', 'cp'}, optional
    The composite's attention rule, which decides the gated product's: ``'attnlrp'`` (default) the uniform rule
    (half of the relevance to each factor), ``'cp'`` the gate held constant (all relevance through ``up``).""",
    'linear_rule': """linear_rule : zennit.core.Hook
    The composite's Linear rule (``Options.linear``: a template, an lxt_ext rule or a zennit ``BasicHook`` rule,
    run in the Gradient x Input convention) for the linear maps the module computes without an ``nn.Linear``.""",
    'input_stabilizer': """input_stabilizer : float, optional
    The epsilon of ``stab(x) = x + input_stabilizer * (sign(x) + [x == 0])`` in the rules' divisions by a tensor
    (the identity rule's ``g_out * f(x) / stab(x)``, explicit relevance turned into a gradient ``R / stab(x)``);
    default 1e-10.""",
    'first_rule': """first_rule : zennit.core.Hook, optional
    The rule of the first Linear/convolution (the layer consuming the input, which emits relevance) instead of
    the composite's, e.g. zennit's ``Flat`` or ``ZBox``.""",
    'explicit_output': """explicit_output : bool, optional
    The layer's backward emits ``R_in`` itself (the first layer, so that attributors return relevance), not
    ``g_in = R_in / stab(x)`` (default False).""",
    'mlp_names': """names : sequence of str, optional
    The module's attribute names of its parts, in the order of the class's ``NAMES`` (its default).""",
    'strict': """strict : bool, optional
    An operation on the relevance path that no rule covers raises ``UncoveredOperationError`` at the forward,
    before any relevance is returned (default True); False: a warning, and its plain gradient.""",
    'tables': """tables : bool, optional
    Modules get the rules of lxt_ext's model tables (default True: fused attention, gated MLPs, norms, Linear
    layers as modules); False: only ``layer_map`` and the first layer's rule, every other operation its rule
    from ``lxt_ext.operations`` (slower; the oracle of the tables).""",
    # lxt_ext.attention: the attention functions' arguments
    'attention_inputs': """query, key, value : torch.Tensor
    ``query`` (B, Hq, Nq, D); ``key``, ``value`` (B, Hkv, Nk, D) with Hq a multiple of Hkv (grouped-query
    attention); any strides.""",
    'attn_mask': """attn_mask : torch.Tensor, optional
    None, bool (True = attend) or floating (added to the scores), broadcastable to (B, Hq, Nq, Nk).""",
    'attention_scale': """scale : float, optional
    Keyword only: the scores' scale (default ``1 / sqrt(D)``).""",
    'is_causal': """is_causal : bool, optional
    Keyword only: query i sees keys j <= i (torch SDPA's top-left convention); may be combined with a mask.""",
    'attention_mode': """mode : {'attnlrp', 'cp'}, optional
    Keyword only: AttnLRP (default) or CP-LRP.""",
    # lxt_ext.attribution: the baselines' and adapters' arguments
    'attributed_model': """model : torch.nn.Module
    The model, left in the mode it is in (call ``model.eval()`` first).""",
    'attributed_input': """x : torch.Tensor
    The model's input batch (already normalised).""",
    'class_target': """target : torch.Tensor
    A LongTensor (N,): the class explained in each row.""",
    # lxt_ext.evaluation: the perturbation curves and what compares methods by them
    'perturbed_model': """model : torch.nn.Module
    The model; its forward gives (N, classes) logits.""",
    'perturbed_input': """x : torch.Tensor
    The model input: images (N, C, H, W) or embeddings (N, T, D).""",
    'perturbed_relevance': """relevance : torch.Tensor
    Shaped like ``x``, or already summed over channels (N, H, W) or embedding dimensions (N, T).""",
    'perturbed_target': """target : int or torch.Tensor
    The explained class, one for all rows or an integer tensor (N,).""",
    'perturbation_mode': """mode : {'deletion', 'insertion'}, optional
    Delete units from ``x`` (default) or insert them into the fill.""",
    'perturbation_unit': """unit : {'pixel', 'patch', 'token'}, optional
    What is perturbed at once (default ``'patch'``).""",
    'patch_size': """patch_size : int, optional
    The side of a square patch in pixels (default 16).""",
    'perturbation_fill': """fill : {'zeros', 'mean', 'blur'} or torch.Tensor, optional
    What replaces a deleted unit (default ``'zeros'``), or a baseline tensor broadcasting to ``x``.""",
    'units_per_step': """units_per_step : int, optional
    Units perturbed per step (default 1).""",
    'max_steps': """max_steps : int, optional
    At most this many steps (default: until every unit is perturbed).""",
    'logits_forward': """forward : callable, optional
    ``forward(model, x) -> logits`` (default ``model(x)``).""",
    'progress': """progress : bool, optional
    Show a progress bar (default True).""",
    'localized_relevance': """relevance : torch.Tensor
    (N, H, W), or (N, C, H, W) summed over channels first.""",
    'object_mask': """mask : torch.Tensor
    (N, H, W) bool, True on the object; an empty mask is an error.""",
    # lxt_ext.cli: every command module's add_arguments(parser) and run(args)
    'command_parser': """parser : argparse.ArgumentParser
    The command's sub-parser (``lxt_ext.cli.parser`` makes one per command).""",
    'command_args': """args : argparse.Namespace
    The parsed arguments.""",
    # lxt_ext.core, lxt_ext.operations: questions about any module's registered rule
    'any_module': """module : torch.nn.Module
    Any module.""",
    # lxt_ext.job.outputs
    'batch_number': """batch : int
    The batch number.""",
}


# a numpydoc section header after a blank line: its title, then a line of dashes
SECTION = r'\n\n\w[\w ]*\n-{3,}\n'


def shared_parameters(*names, leading=False):
    """Decorator: add the entries ``names`` of :data:`ENTRIES` to the docstring's Parameters section.

    Parameters
    ----------
    *names : str
        Keys of :data:`ENTRIES`, in signature order.
    leading : bool
        Put them before the section's own entries (else after them).

    Returns
    -------
    callable
        The decorator (it returns the object with its ``__doc__`` extended).
    """
    def decorate(obj):
        doc = inspect.cleandoc(obj.__doc__ or '').rstrip()
        shared = '\n'.join(ENTRIES[name] for name in names)
        header = 'Parameters\n----------\n'
        if header not in doc:
            # numpydoc's order puts Parameters before every other section (Returns, Raises, ...)
            first = re.search(SECTION, doc)
            at = len(doc) if first is None else first.start()
            obj.__doc__ = doc[:at].rstrip('\n') + '\n\n' + header + shared + doc[at:]
            obj.__doc__ += '' if obj.__doc__.endswith('\n') else '\n'
            return obj
        start = doc.index(header) + len(header)
        following = re.search(SECTION, doc[start:])  # the next section, if any
        end = len(doc) if following is None else start + following.start()
        if leading:
            doc = doc[:start] + shared + '\n' + doc[start:]
        else:
            doc = doc[:end].rstrip('\n') + '\n' + shared + doc[end:]
        obj.__doc__ = doc + ('' if doc.endswith('\n') else '\n')
        return obj
    return decorate
