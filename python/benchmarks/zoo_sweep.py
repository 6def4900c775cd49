"""Sweep the model zoos of transformers and timm: every model type built tiny with random weights and its additive
offsets zeroed, explained with lxt_ext, and given one verdict:

- ``exact``: the registered forward gives the plain output and the input relevance sums to the explained logit
  within ``--rtol`` (LRP with CP attention and epsilon -> 0 conserves once biases and position tables are zero),
  and the same composite with AttnLRP runs too (forward unchanged, relevance finite; a refusal or error there is
  the verdict instead, its detail starting with "AttnLRP");
- ``refused``: lxt_ext refused it by name (``NotExplainableError`` and its kind, at registration, or in the
  forward before any relevance), as it should when it has no rule;
- ``leaks``: relevance came back and does not sum to the logit: a wrong heatmap without a word (the worst case);
- ``changes output``: the forward under the composite differs from the plain one;
- ``crash``: an error that is not lxt_ext's (or a timeout, or the memory limit);
- ``not built``: no tiny config gave a model whose plain forward runs (not lxt_ext's concern), or its logits
  vanish (below 1e-20).

The zoos (``--zoo``, repeatable; default all):

- ``causal_lm``, ``masked_lm``, ``sequence_classification``: transformers' mappings of those heads, explained
  with ``LanguageTransformer(attention='cp')`` w.r.t. the input embeddings, the top logit (at the last token for
  language-model heads);
- ``seq2seq_lm``: w.r.t. the encoder and the decoder input embeddings together (one input, the two concatenated
  along the sequence axis; conservation over both), the top logit at the last decoder token; a decoder-only type
  of that mapping (an audio-language model) w.r.t. its input embeddings;
- ``image_classification`` (transformers) and ``timm_vit`` (timm's vision-transformer families, one variant per
  architecture, the smallest, shrunk where over 30M parameters): w.r.t. the pixels, with
  ``ViTEpsilon(attention='cp', epsilon=1e-12)``, convolutional networks too (its fused epsilon takes convolutions,
  lxt_ext's tables batch norms and activations, the operation rules the rest; lxt_ext's CNN composites put z-plus,
  alpha-beta or gamma on convolutions, none epsilon alone, so none is checked by conservation). transformers' image models get their
  convolution and Linear weights redrawn with variance 1 / fan-in and their normalisation scales set to 1
  (``variance_preserving``: with transformers' initialisation a deep CNN's logits vanish); a model whose logits
  vanish all the same is ``not built``.

How each type is made tiny: ``zoo_configs.py``. Each type runs in a forked child with an address-space limit and
a time limit, so that a config that allocates gigabytes or hangs ends only itself; ``--jobs`` children at once,
each with torch on one thread. Writes ``<zoo>.json`` and ``<zoo>.md`` per zoo and ``summary.md`` (every zoo's
JSON in ``--out``) to ``--out``:

    python python/benchmarks/zoo_sweep.py --out docs/zoo --jobs 4            # every zoo
    python python/benchmarks/zoo_sweep.py --zoo causal_lm llama mamba --out /tmp/zoo
    python python/benchmarks/zoo_sweep.py --table-from docs/zoo --out docs/zoo   # tables of the JSON only
"""
import argparse
import glob
import json
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import sys
import time
import traceback

import zoo_configs
from zoo_configs import TINY  # noqa: F401  (the first shrink, kept importable)

VERDICTS = ('exact', 'refused', 'leaks', 'changes output', 'crash', 'not built')
# lxt_ext's refusals: NotExplainableError and its subclasses, and the non-finite check, by class name anywhere in
# the error's MRO (the sweep needs no import of lxt_ext.errors, which older lxt_ext versions lack)
LXT_EXT_ERRORS = ('NotExplainableError', 'UnmappedModuleError', 'UncoveredOperationError', 'UnsupportedLayerError',
                  'NonFiniteError')
# zoo -> (the mapping in transformers.models.auto.modeling_auto, or None for timm; how it is explained)
ZOOS = {
    'causal_lm': ('MODEL_FOR_CAUSAL_LM_MAPPING_NAMES', 'text'),
    'masked_lm': ('MODEL_FOR_MASKED_LM_MAPPING_NAMES', 'text'),
    'sequence_classification': ('MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES', 'text'),
    'seq2seq_lm': ('MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES', 'seq2seq'),
    'image_classification': ('MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES', 'image'),
    'timm_vit': (None, 'image'),
}
TRANSFORMERS_ZOOS = tuple(zoo for zoo, (mapping, _) in ZOOS.items() if mapping)
TITLES = {
    'causal_lm': ('The causal-LM zoo', "transformers' causal-LM mapping"),
    'masked_lm': ('The masked-LM zoo', "transformers' masked-LM mapping"),
    'sequence_classification': ('The sequence-classification zoo', "transformers' sequence-classification mapping"),
    'seq2seq_lm': ('The sequence-to-sequence zoo', "transformers' sequence-to-sequence LM mapping"),
    'image_classification': ('The image-classification zoo', "transformers' image-classification mapping"),
    'timm_vit': ("timm's vision transformers", "timm's vision-transformer families"),
}
HOW = {
    'text': "explained with `LanguageTransformer(attention='cp')` w.r.t. its input embeddings (the top logit, at "
            'the last token for language-model heads)',
    'seq2seq': "explained with `LanguageTransformer(attention='cp')` w.r.t. the encoder and decoder input "
               'embeddings together (the top logit at the last decoder token)',
    'image': "explained w.r.t. the pixels with `ViTEpsilon(attention='cp', epsilon=1e-12)` (convolutional "
             'networks too: its fused epsilon takes convolutions, the tables batch norms and activations, the '
             'operation rules the rest)',
}
TEXT_COMPOSITE = "LanguageTransformer(attention='cp')"
VIT_COMPOSITE = "ViTEpsilon(attention='cp', epsilon=1e-12)"
TINY_OUTPUT = 1e-20  # a model whose logits are all below this (with offsets zeroed) is not a test


class NotBuilt(Exception):
    """No tiny model of a type could be built (or its plain forward failed)."""


def lxt_ext_refusal(error, text):
    """Whether ``error`` is lxt_ext's refusal: an error whose class (or a base class) is one of lxt_ext's refusals,
    or an error raised from lxt_ext's code that says what lxt_ext does not cover."""
    if any(cls.__name__ in LXT_EXT_ERRORS for cls in type(error).__mro__):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    raised_by_lxt_ext = bool(frames) and f'{os.sep}lxt_ext{os.sep}' in frames[-1].filename
    return raised_by_lxt_ext and isinstance(error, (NotImplementedError, TypeError, ValueError)) and 'lxt_ext' in text


def _short(error, length=200):
    return f'{type(error).__name__}: {" ".join(str(error).split())[:length]}'


def model_class(zoo, model_type):
    import transformers
    from transformers.models.auto import modeling_auto

    name = getattr(modeling_auto, ZOOS[zoo][0])[model_type]
    return getattr(transformers, name[0] if isinstance(name, (tuple, list)) else name)


def _text_forward(model, embeds):
    """``forward(m, x)`` for a model taking ``inputs_embeds`` (``use_cache=False`` where it takes it)."""
    import torch

    for extra in ({'use_cache': False}, {}):
        def forward(m, x, extra=extra):
            return m(inputs_embeds=x, **extra).logits
        try:
            with torch.no_grad():
                forward(model, embeds)
            return forward
        except TypeError as error:
            if not extra or 'use_cache' not in str(error):
                raise
    raise AssertionError('unreachable')


def _sample(zoo, model, config):
    """``(x, forward, inputs)``: the input, the forward taking it, and what it is, for a built transformers model;
    the plain forward has run once."""
    import torch

    kind = ZOOS[zoo][1]
    generator = torch.Generator().manual_seed(1)
    if kind == 'image':
        size = getattr(config, 'image_size', None) or 32
        height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        channels = getattr(config, 'num_channels', None) or 3
        x = torch.randn(1, channels, height, width, generator=generator)

        def forward(m, x):
            return m(pixel_values=x).logits
        try:
            with torch.no_grad():
                forward(model, x)
        except TypeError as error:
            if 'pixel_values' not in str(error):
                raise

            def forward(m, x):
                return m(x).logits
            with torch.no_grad():
                forward(model, x)
        return x, forward, 'pixels'
    text = config.get_text_config() if hasattr(config, 'get_text_config') else config
    vocab = getattr(text, 'vocab_size', None) or 64
    ids = torch.randint(3, max(4, min(vocab, 48)), (1, 6), generator=generator)
    embedding = model.get_input_embeddings()
    if embedding is None:
        raise NotBuilt('get_input_embeddings() is None')
    if getattr(config, 'is_encoder_decoder', False):  # an encoder-decoder, in any text zoo
        decoder = model.get_decoder() if hasattr(model, 'get_decoder') else None
        decoder_embedding = getattr(decoder, 'get_input_embeddings', lambda: None)() or embedding
        encoder_embeds = embedding(ids).detach()
        decoder_ids = torch.randint(3, max(4, min(vocab, 48)), (1, 4), generator=generator)
        decoder_embeds = decoder_embedding(decoder_ids).detach()
        if encoder_embeds.shape[2:] != decoder_embeds.shape[2:]:
            raise NotBuilt(f'encoder embeddings {tuple(encoder_embeds.shape)} and decoder embeddings '
                           f'{tuple(decoder_embeds.shape)} differ in width')
        split = encoder_embeds.shape[1]

        def forward(m, x):
            return m(inputs_embeds=x[:, :split], decoder_inputs_embeds=x[:, split:], use_cache=False).logits
        x = torch.cat([encoder_embeds, decoder_embeds], dim=1)
        with torch.no_grad():
            forward(model, x)
        return x, forward, f'encoder ({split}) + decoder ({x.shape[1] - split}) embeddings'
    x = embedding(ids).detach()
    return x, _text_forward(model, x), 'input embeddings'


def variance_preserving(model, seed=0):
    """Redraw the weights of ``model``'s convolutions and Linear layers with variance ``1 / fan_in``, and set its
    normalisations' scales to 1: transformers draws some of them with a fixed standard deviation
    (``initializer_range``, 0.02), under which a deep CNN's activations vanish (efficientnet's logits near 1e-30),
    and a zero logit explains nothing."""
    import torch

    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, 'weight', None)
            if not isinstance(weight, torch.Tensor) or not weight.numel():
                continue
            if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
                weight.copy_(torch.randn(weight.shape, generator=generator) / weight[0].numel() ** .5)
            elif isinstance(module, norms):
                weight.fill_(1.)


def build_transformers(zoo, model_type):
    """``(model, x, forward, about)`` of the first candidate config (``zoo_configs.candidates``) that builds."""
    import torch

    try:
        cls = model_class(zoo, model_type)
        configs = zoo_configs.candidates(model_type, getattr(cls, 'config_class', None), zoo)
    except Exception as error:  # noqa: BLE001
        raise NotBuilt(_short(error)) from None
    errors = []
    for label, config in configs:
        try:
            torch.manual_seed(0)
            model = cls(config).eval()
            if ZOOS[zoo][1] == 'image':
                variance_preserving(model)
            x, forward, inputs = _sample(zoo, model, config)
        except Exception as error:  # noqa: BLE001
            errors.append(f'{label}: {_short(error)}')
            model = None
            continue
        parameters = sum(p.numel() for p in model.parameters())
        return model, x, forward, {'config': label, 'inputs': inputs, 'parameters': parameters}
    distinct = {}  # error -> the configs that gave it
    for error in errors:
        label, text = error.split(': ', 1)
        distinct.setdefault(text, []).append(label)
    if len(distinct) == 1:
        raise NotBuilt(next(iter(distinct)))
    raise NotBuilt(' / '.join(f'[{"; ".join(labels)}] {text}' for text, labels in distinct.items()))


def build_timm(name):
    """``(model, x, forward, about)`` of timm's ``name`` (shrunk where over the parameter limit)."""
    import timm
    import torch

    try:
        cls, kwargs, size = zoo_configs.TIMM_OVERRIDES.get(name, (None, None, None))
        torch.manual_seed(0)
        if cls is not None:
            module, cls = cls.split('.')
            model = getattr(getattr(timm.models, module), cls)(**kwargs).eval()
            parameters = sum(p.numel() for p in model.parameters())
        else:
            if kwargs is None:
                kwargs, parameters = zoo_configs.timm_variant(name)
            else:
                parameters = zoo_configs.parameter_count(name, **kwargs)
            model = timm.create_model(name, pretrained=False, **kwargs).eval()
        size = size or timm.data.resolve_model_data_config(model)['input_size']
        x = torch.randn(1, *size, generator=torch.Generator().manual_seed(1))

        def forward(m, x):
            return m(x)
        with torch.no_grad():
            forward(model, x)
    except Exception as error:  # noqa: BLE001
        raise NotBuilt(_short(error)) from None
    about = {'config': ', '.join(f'{k}={v}' for k, v in kwargs.items()) or 'default', 'inputs': 'pixels',
             'parameters': parameters, 'architecture': zoo_configs.architecture(name)}
    return model, x, forward, about


def composite_for(kind, model, forward, x):
    """``(composite, its name)`` for a zoo kind and a built model: images, transformers and convolutional networks
    alike, with ``ViTEpsilon`` (its fused epsilon takes convolutions, its tables batch norms and activations, the
    operation rules the rest)."""
    from lxt_ext.composites import LanguageTransformer, ViTEpsilon

    if kind != 'image':
        return LanguageTransformer(attention='cp'), TEXT_COMPOSITE
    return ViTEpsilon(attention='cp', epsilon=1e-12), VIT_COMPOSITE


def explain(zoo, name, rtol):
    """The verdict of one model type of ``zoo`` (run in the child)."""
    import warnings

    import torch
    from lxt_ext.attribution import Explainer
    from lxt_ext.diagnostics.conservation import zeroed

    torch.set_num_threads(1)
    warnings.filterwarnings('ignore')
    try:
        import transformers
        transformers.logging.set_verbosity(transformers.logging.CRITICAL)
    except ImportError:
        pass
    kind = ZOOS[zoo][1]
    try:
        model, x, forward, about = build_timm(name) if zoo == 'timm_vit' else build_transformers(zoo, name)
    except NotBuilt as error:
        return {'verdict': 'not built', 'detail': str(error)[:400]}
    try:
        composite, composite_name = composite_for(kind, model, forward, x)
    except Exception as error:  # noqa: BLE001
        return {'verdict': 'crash', 'detail': f'choosing the composite: {_short(error)}', **about}
    about = {**about, 'composite': composite_name}
    with zeroed(model) as names, torch.no_grad():
        plain = forward(model, x.clone()).float()  # a copy: some models scale their input in place (CTRL)
    if kind == 'image' and not float(plain.abs().max()) > TINY_OUTPUT and _tokens(model):
        # the learned tokens carry the whole output (CoaT's class tokens, under factorised attention): kept, and
        # their relevance counted
        return _explain_counting_tokens(model, x, forward, composite, rtol, about)
    try:
        with zeroed(model):
            with Explainer(model, composite, forward=forward) as explainer:
                e = explainer(x)
    except Exception as error:  # noqa: BLE001
        text = f'{type(error).__name__}: {error}'
        if lxt_ext_refusal(error, text):
            return {'verdict': 'refused', 'detail': (text.strip().splitlines() or [text])[0][:300], **about}
        return {'verdict': 'crash', 'detail': ' '.join(text.split())[:300], **about}
    output = e.output.float()
    if not float(plain.abs().max()) > TINY_OUTPUT:
        return {'verdict': 'not built', 'detail': f'the output vanishes (max |logit| {float(plain.abs().max()):.2g} '
                                                  'with offsets zeroed): nothing to explain', **about}
    scale = float(plain.abs().max()) or 1.
    if not torch.allclose(output, plain, rtol=1e-4, atol=1e-5 * scale):
        return {'verdict': 'changes output', 'detail': f'max |difference| {float((output - plain).abs().max()):.3g}',
                **about}
    total, logit = float(e.relevance.double().sum()), float(e.score.double().sum())
    error = abs(total - logit) / max(abs(logit), 1e-12)
    verdict = 'exact' if error <= rtol else 'leaks'
    detail = f'relative error {error:.2g} (logit {logit:.3g}, zeroed {len(names)} offsets)'
    if verdict == 'exact':
        failed = attnlrp_runs(kind, model, forward, x, plain)
        if failed is not None:
            return {**failed, **about}
    return {'verdict': verdict, 'detail': detail, 'error': error, 'logit': logit, **about}


def attnlrp_runs(kind, model, forward, x, plain, patterns=None):
    """None where the same model explained under AttnLRP (not conservative by design: no sum to check) runs with
    the forward unchanged and finite relevance, else the verdict it earns (``refused``, ``changes output``,
    ``crash``), its detail naming AttnLRP. The offsets are zeroed as for ``plain`` (``patterns``: those of
    ``zeroed``, default all)."""
    import torch
    from lxt_ext.attribution import Explainer
    from lxt_ext.composites import LanguageTransformer, ViTEpsilon
    from lxt_ext.diagnostics.conservation import zeroed

    composite = LanguageTransformer(attention='attnlrp') if kind != 'image' else \
        ViTEpsilon(attention='attnlrp', epsilon=1e-12)
    try:
        with zeroed(model) if patterns is None else zeroed(model, patterns):
            with Explainer(model, composite, forward=forward) as explainer:
                e = explainer(x)
    except Exception as error:  # noqa: BLE001
        text = f'{type(error).__name__}: {error}'
        if lxt_ext_refusal(error, text):
            return {'verdict': 'refused', 'detail': 'AttnLRP: ' + (text.strip().splitlines() or [text])[0][:290]}
        return {'verdict': 'crash', 'detail': 'AttnLRP: ' + ' '.join(text.split())[:290]}
    output = e.output.float()
    scale = float(plain.abs().max()) or 1.
    if not torch.allclose(output, plain, rtol=1e-4, atol=1e-5 * scale):
        return {'verdict': 'changes output', 'detail': f'AttnLRP: max |difference| '
                f'{float((output - plain).abs().max()):.3g}'}
    if not bool(torch.isfinite(e.relevance).all()):
        return {'verdict': 'crash', 'detail': 'AttnLRP: non-finite relevance'}
    return None


TOKENS = ('*cls_token*', '*dist_token', '*class_token', '*reg_token', '*class_embedding', '*embeddings.latents')


def _tokens(model):
    """The learned tokens of ``model`` (class and register tokens, latents) among the offsets ``zeroed`` zeroes."""
    import fnmatch
    return [(name, p) for name, p in model.named_parameters() if any(fnmatch.fnmatchcase(name, t) for t in TOKENS)]


def _explain_counting_tokens(model, x, forward, composite, rtol, about):
    """The verdict of an image model whose output vanishes with its learned tokens zeroed: the other offsets
    zeroed, the tokens kept, and conservation over the pixels' relevance plus the tokens' (``R = token * g`` in the
    Gradient x Input convention: a token is an input the model holds)."""
    import fnmatch

    import torch
    from lxt_ext.attribution import logits_of
    from lxt_ext.diagnostics.conservation import ADDITIVE, zeroed

    tokens = _tokens(model)
    patterns = [p for p in ADDITIVE if not any(fnmatch.fnmatchcase(t, p) for t in TOKENS)]
    with zeroed(model, patterns) as names:
        with torch.no_grad():
            plain = logits_of(forward(model, x.clone())).float()
        with composite.context(model):
            pixels = x.clone().requires_grad_()
            output = logits_of(forward(model, pixels))
            seed = torch.zeros_like(output)
            top = output.detach().flatten(1).argmax(1)
            seed.view(len(seed), -1)[torch.arange(len(seed)), top] = output.detach().view(len(seed), -1)[
                torch.arange(len(seed)), top]
            grads = torch.autograd.grad(output, [pixels] + [p for _, p in tokens], seed, allow_unused=True)
    if not torch.allclose(output.detach().float(), plain, rtol=1e-4, atol=1e-5 * float(plain.abs().max())):
        return {'verdict': 'changes output', 'detail': 'max |difference| '
                f'{float((output.detach().float() - plain).abs().max()):.3g}', **about}
    # the first layer emits relevance: the pixels' gradient is their relevance
    pixel_relevance = float(grads[0].double().sum())
    token_relevance = sum(float((p.detach().double() * g.double()).sum()) for (_, p), g in zip(tokens, grads[1:])
                          if g is not None)
    logit = float(seed.double().sum())
    error = abs(pixel_relevance + token_relevance - logit) / max(abs(logit), 1e-12)
    detail = (f'relative error {error:.2g} (logit {logit:.3g}, zeroed {len(names)} offsets; the tokens kept, '
              f'their relevance {token_relevance / logit:.0%} of the logit)')
    if error <= rtol:
        failed = attnlrp_runs('image', model, forward, x, plain, patterns)
        if failed is not None:
            return {**failed, **about}
    return {'verdict': 'exact' if error <= rtol else 'leaks', 'detail': detail, 'error': error, 'logit': logit,
            **about}


def _child(zoo, name, rtol, memory_gb, send):
    resource.setrlimit(resource.RLIMIT_AS, (memory_gb << 30, memory_gb << 30))
    try:
        send.send(explain(zoo, name, rtol))
    except MemoryError:
        send.send({'verdict': 'crash', 'detail': f'over the {memory_gb} GB limit'})
    except BaseException as error:  # noqa: BLE001
        send.send({'verdict': 'crash', 'detail': f'{type(error).__name__}: {str(error)[:300]}'})


def run_many(tasks, rtol, memory_gb, seconds, jobs=1, report=None):
    """``{(zoo, name): result}`` of ``tasks`` (``[(zoo, name)]``), ``jobs`` forked children at a time."""
    context = multiprocessing.get_context('fork')
    pending, running, results = list(tasks), {}, {}

    def finish(receive, result):
        task, child, start = running.pop(receive)
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
        child.join()
        receive.close()
        if result is None:
            result = {'verdict': 'crash', 'detail': f'the child ended with {child.exitcode}'}
        result['seconds'] = round(time.perf_counter() - start, 1)
        results[task] = result
        if report:
            report(task, result, len(results), len(tasks))

    while pending or running:
        while pending and len(running) < max(1, jobs):
            task = pending.pop(0)
            receive, send = context.Pipe(duplex=False)
            child = context.Process(target=_child, args=(*task, rtol, memory_gb, send))
            child.start()
            send.close()  # the child's end only: the pipe ends (EOF) when the child does
            running[receive] = (task, child, time.perf_counter())
        now = time.perf_counter()
        wait = min(start + seconds for _, _, start in running.values()) - now
        for receive in multiprocessing.connection.wait(list(running), timeout=max(0., wait)):
            try:
                result = receive.recv()
            except (EOFError, OSError):
                result = None
            finish(receive, result)
        now = time.perf_counter()
        for receive, (_, _, start) in list(running.items()):
            if now - start >= seconds:
                finish(receive, {'verdict': 'crash', 'detail': f'no verdict in {seconds} s'})
    return results


def run_one(model_type, rtol, memory_gb, seconds, zoo='causal_lm'):
    """The result of one type of ``zoo`` (a forked child)."""
    return run_many([(zoo, model_type)], rtol, memory_gb, seconds)[(zoo, model_type)]


def counts_of(results):
    verdicts = [result['verdict'] for name, result in results.items() if not name.startswith('_')]
    counts = {verdict: verdicts.count(verdict) for verdict in VERDICTS}
    counts['built'] = sum(counts[verdict] for verdict in VERDICTS) - counts['not built']
    return counts


def _cell(text):
    return str(text).replace('|', '\\|').replace('\n', ' ')


def table(results, command, zoo='causal_lm'):
    title, what = TITLES[zoo]
    counts, built = counts_of(results), counts_of(results)['built']
    versions = ', '.join(f'{library} {results[key]}' for library, key in (('transformers', '_transformers'),
                                                                         ('timm', '_timm')) if results.get(key))
    if zoo == 'timm_vit':
        what = (f'one model per architecture of {what}: the smallest variant (shrunk where over '
                f'{zoo_configs.TIMM_MAX_PARAMETERS / 1e6:.0f}M parameters), random weights, offsets zeroed')
    else:
        weights = ('random weights, those of convolutions and Linear layers drawn with variance 1 / fan-in and '
                   'normalisation scales 1' if ZOOS[zoo][1] == 'image' else 'random weights')
        what = f'each model type of {what} built from a tiny config ({weights}, offsets zeroed)'
    lines = [f'# {title} under lxt_ext (generated)', '',
             f'Generated by `{command}`; {versions}. {what[0].upper() + what[1:]}, {HOW[ZOOS[zoo][1]]}.',
             '', '| verdict | types |', '|---|---|']
    lines += [f'| {verdict} | {counts[verdict]} |' for verdict in VERDICTS]
    lines += ['', f'{built} built; exact: {counts["exact"]} of {built}.', '']
    image = ZOOS[zoo][1] == 'image'
    head = ['type', 'verdict', 'detail'] + (['composite'] if image else []) + (['config'] if zoo != 'timm_vit'
                                                                            else ['architecture', 'shrunk'])
    lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for name, result in sorted(results.items()):
        if name.startswith('_'):
            continue
        row = [name, result['verdict'], result.get('detail', '')]
        if image:
            row.append(result.get('composite', ''))
        row += ([result.get('config', '')] if zoo != 'timm_vit'
                else [result.get('architecture', ''), result.get('config', '')])
        lines.append('| ' + ' | '.join(_cell(cell) for cell in row) + ' |')
    return '\n'.join(lines) + '\n'


def summary(zoo_results):
    """The summary table: one row per zoo in ``zoo_results`` (``{zoo: results}``), and the transformers zoos'
    totals."""
    columns = ('built',) + VERDICTS
    lines = ['# The zoos under lxt_ext (generated)', '',
             'One row per zoo swept (`python/benchmarks/zoo_sweep.py`); each zoo\'s table (`<zoo>.md`) has a row '
             'per model type. exact %: exact of built.', '',
             '| zoo | ' + ' | '.join(columns) + ' | exact % |', '|---|' + '---|' * (len(columns) + 1)]

    def row(name, counts):
        share = f'{100 * counts["exact"] / counts["built"]:.1f} %' if counts['built'] else '-'
        return f'| {name} | ' + ' | '.join(str(counts[c]) for c in columns) + f' | {share} |'

    total = dict.fromkeys(columns, 0)
    for zoo in ZOOS:
        if zoo in zoo_results:
            counts = counts_of(zoo_results[zoo])
            lines.append(row(zoo, counts))
            if zoo in TRANSFORMERS_ZOOS:
                total = {c: total[c] + counts[c] for c in columns}
    swept = [zoo for zoo in TRANSFORMERS_ZOOS if zoo in zoo_results]
    if swept:
        lines.append(row(f'transformers ({len(swept)} zoos)', total))
    return '\n'.join(lines) + '\n'


def write_tables(folder, out):
    """``<zoo>.md`` for every ``<zoo>.json`` in ``folder``, and ``summary.md``, written to ``out``."""
    zoo_results = {}
    for path in sorted(glob.glob(os.path.join(folder, '*.json'))):
        zoo = os.path.splitext(os.path.basename(path))[0]
        if zoo in ZOOS:
            with open(path) as file:
                zoo_results[zoo] = json.load(file)
    os.makedirs(out, exist_ok=True)
    for zoo, results in zoo_results.items():
        with open(os.path.join(out, f'{zoo}.md'), 'w') as file:
            file.write(table(results, results.get('_command', ''), zoo))
    if zoo_results:
        with open(os.path.join(out, 'summary.md'), 'w') as file:
            file.write(summary(zoo_results))
    return zoo_results


def zoo_types(zoo, asked=()):
    """The model types of ``zoo`` (those of ``asked`` it has, when types are asked for)."""
    if ZOOS[zoo][0] is None:
        import timm
        if asked:
            return [name for name in asked if timm.is_model(name)]
        return sorted(zoo_configs.timm_architectures())
    from transformers.models.auto import modeling_auto

    mapping = getattr(modeling_auto, ZOOS[zoo][0])
    return [name for name in asked if name in mapping] if asked else sorted(mapping)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('types', nargs='*', help='model types (timm: model names); default: every type of each zoo')
    parser.add_argument('--zoo', action='append', choices=list(ZOOS), help='a zoo to sweep (repeatable; default all)')
    parser.add_argument('--out', required=True, help='folder for <zoo>.json, <zoo>.md and summary.md')
    parser.add_argument('--rtol', type=float, default=1e-3)
    parser.add_argument('--memory-gb', type=int, default=6)
    parser.add_argument('--seconds', type=int, default=180)
    parser.add_argument('--jobs', type=int, default=1, help='children at once (each with torch on one thread)')
    parser.add_argument('--table-from', metavar='DIR',
                        help="only write the tables of an earlier sweep's <zoo>.json files in DIR (or one JSON file)")
    args = parser.parse_args(argv)
    command = 'python python/benchmarks/zoo_sweep.py ' + ' '.join(sys.argv[1:] if argv is None else argv)
    if args.table_from:
        folder = args.table_from
        if os.path.isfile(folder):  # one JSON file (the first sweep wrote causal_lm.json alone)
            with open(folder) as file:
                results = json.load(file)
            zoo = results.get('_zoo') or os.path.splitext(os.path.basename(folder))[0]
            zoo = zoo if zoo in ZOOS else 'causal_lm'
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f'{zoo}.md'), 'w') as file:
                file.write(table(results, results.get('_command', command), zoo))
            return 0
        return 0 if write_tables(folder, args.out) else 1
    import torch
    torch.set_num_threads(1)
    zoos = args.zoo or list(ZOOS)
    # imported once here, so that every forked child has them
    import lxt_ext.attribution  # noqa: F401
    import lxt_ext.composites  # noqa: F401
    versions = {}
    if any(zoo in TRANSFORMERS_ZOOS for zoo in zoos):
        import transformers
        versions['_transformers'] = transformers.__version__
    if 'timm_vit' in zoos:
        import timm
        versions['_timm'] = timm.__version__
    tasks = [(zoo, name) for zoo in zoos for name in zoo_types(zoo, args.types)]
    unknown = [name for name in args.types if not any(name == task[1] for task in tasks)]
    if unknown:
        print(f'in none of the zoos {zoos}: {unknown}', file=sys.stderr)

    def report(task, result, done, total):
        print(f'[{done}/{total}] {task[0]} {task[1]}: {result["verdict"]} ({result["detail"][:100]})', flush=True)

    results = run_many(tasks, args.rtol, args.memory_gb, args.seconds, args.jobs, report)
    os.makedirs(args.out, exist_ok=True)
    for zoo in zoos:
        names = [name for task_zoo, name in tasks if task_zoo == zoo]
        if not names:
            continue
        zoo_results = {'_zoo': zoo, '_command': command, **versions,
                       **{name: results[(zoo, name)] for name in names}}
        with open(os.path.join(args.out, f'{zoo}.json'), 'w') as file:
            json.dump(zoo_results, file, indent=1)
    write_tables(args.out, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
