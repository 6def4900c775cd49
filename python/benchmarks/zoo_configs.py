"""Tiny models for the zoo sweep (``zoo_sweep.py``): transformers' configs shrunk to a few layers of width 64,
and timm's vision transformers, one variant per architecture.

A transformers type is built from the config class its model class takes (a text model of a multimodal type takes
the text config), from the first of these candidates that gives a model whose plain forward runs:

- ``tiny``: the default config with every size it has shrunk by name (``SIZES``: the standard names map through the
  config's ``attribute_map``); its per-layer lists (``layer_types``, ``mlp_layer_types``, a heterogeneous config's
  per-layer overrides) cut to one layer of each kind, in their first order, at least two; its per-stage lists
  (``STAGES``: ``depths``, ``hidden_sizes``, ...) cut in width and depth with their stage count kept; special
  token ids (image, audio placeholders) moved into the tiny vocabulary; ``TINY`` (the first shrink's names, stored
  where a config does not know them); its sub-configs (``text_config``, ``vision_config``, ``encoder``, ...)
  shrunk the same way, with the names they know only; then the type's entry of ``OVERRIDES``;
- the ``VARIANTS`` of it, on the names the config knows only: as is (a name it does not know may be a read-only
  property: Falcon's ``head_dim``), without ``head_dim`` (derived: multi-head latent attention's rotary width),
  with as many key-value heads as heads (multi-head latent attention), without a window (``sliding_window`` and
  ``attention_chunk_size`` are exclusive in some configs), each in the sub-configs too;
- ``legacy``: ``TINY`` and the override alone (the sweep's first shrink).

``OVERRIDES`` holds what the generic shrink cannot know, sized after the ModelTester classes of transformers' own
tests (``tests/models/<type>/test_modeling_<type>.py``) or the configs' validation.
"""
import copy
import dataclasses
import inspect
import re

# the sweep's first shrink: transformers' configs map these standard names onto their own (attribute_map), and a
# name a config does not know is only stored on it
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=64, max_position_embeddings=64, num_experts=4, num_local_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32, n_routed_experts=4,
            n_shared_experts=1, first_k_dense_replace=1, state_size=8, ssm_state_size=8, expand=2, conv_kernel=4,
            time_step_rank=8, mamba_d_state=8, mamba_n_heads=4, mamba_d_head=16, kv_lora_rank=16, q_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, sliding_window=16, attention_chunk_size=16,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

# integer sizes by name, set where the config has a field of that name holding an int (or None)
SIZES = dict(
    hidden_size=64, d_model=64, n_embd=64, n_embed=64, d_embed=64, embed_dim=64, dim=64, word_embed_proj_dim=64,
    projection_dim=64, embedding_size=64, intermediate_size=128, ffn_dim=128, encoder_ffn_dim=128,
    decoder_ffn_dim=128, d_ff=128, n_inner=128, ffn_hidden_size=128, num_hidden_layers=2, num_layers=2, n_layer=2,
    n_layers=2, encoder_layers=2, decoder_layers=2, num_encoder_layers=2, num_decoder_layers=2, num_attention_heads=4,
    n_head=4, n_heads=4, encoder_attention_heads=4, decoder_attention_heads=4, num_heads=4, num_key_value_heads=2,
    num_kv_heads=2, n_kv_heads=2, head_dim=16, d_kv=16, kv_channels=16, vocab_size=64, max_position_embeddings=64,
    n_positions=64, n_ctx=64, max_seq_len=64, image_size=32, patch_size=4, num_labels=10, num_channels=3,
    rotary_dim=8, expand=1, index_topk=4, index_head_dim=16, index_n_heads=4, index_num_heads=2,
    vocab_size_per_layer_input=64, hidden_size_per_layer_input=16, mamba_expand=1, n_group=1, topk_group=1,
    n_groups=1, mamba_n_groups=1, mamba_d_ssm=64, encoder_hash_byte_group_vocab=64)
# per-stage lists (hierarchical vision models): a stage count kept, each cut to this (i: the stage)
STAGES = dict(
    depths=lambda i, old: 1, hidden_sizes=lambda i, old: 16 << i, embed_dims=lambda i, old: 16 << i,
    dims=lambda i, old: 16 << i, widths=lambda i, old: 16 << i, hidden_dims=lambda i, old: 16 << i,
    num_heads=lambda i, old: 1 << i, num_attention_heads=lambda i, old: 1 << i, mlp_ratios=lambda i, old: 2,
    embed_dim=lambda i, old: 16 << i)
NOT_WINDOWED = ('sliding_window', 'attention_chunk_size')
KEPT = ('num_stages',)  # counts the per-stage lists keep (a vision config's num_hidden_layers may map to them)
SPECIAL_TOKENS = (48, 63)  # ids from 48 are moved to 63, 62, ... (the sample's ids are below 48)
KV_HEADS = ('num_key_value_heads', 'num_kv_heads', 'n_kv_heads')

# type -> keyword arguments the generic shrink cannot know (from transformers' ModelTesters and the configs'
# validation); a dict value for a sub-config name is merged into that sub-config; '_default': keyword arguments of
# the default config itself; '<zoo>:<type>' adds to '<type>' in that zoo
OVERRIDES = {
    # image classification (transformers' ModelTesters' sizes)
    'bit': dict(num_groups=1, embedding_size=16),
    'donut-swin': dict(image_size=32, patch_size=2, embed_dim=16, depths=[1, 2, 1], num_heads=[2, 2, 4], window_size=2),
    'efficientnet': dict(image_size=32, kernel_sizes=[3, 3, 5], in_channels=[32, 16, 24], out_channels=[16, 24, 40],
                         strides=[1, 1, 2], num_block_repeats=[1, 1, 2], expand_ratios=[1, 6, 6], hidden_dim=1280,
                         depth_coefficient=1.0, width_coefficient=1.0, depthwise_padding=[]),
    'hgnet_v2': dict(image_size=32, embedding_size=10, hidden_sizes=[64, 128, 256, 512],
                     stage_in_channels=[16, 64, 128, 256], stage_mid_channels=[16, 32, 64, 128],
                     stage_out_channels=[64, 128, 256, 512], stage_num_blocks=[1, 1, 2, 1],
                     stage_downsample=[False, True, True, True], stage_light_block=[False, False, True, True],
                     stage_kernel_size=[3, 3, 5, 5], stage_numb_of_layers=[3, 3, 3, 3], stem_channels=[3, 16, 16],
                     depths=[1, 1, 2, 1]),
    'levit': dict(image_size=64, patch_size=16, hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3],
                  depths=[1, 1, 1], key_dim=[8, 8, 8], mlp_ratio=[2, 2, 2], attention_ratio=[2, 2, 2]),
    'perceiver': dict(num_latents=8, d_latents=32, num_self_attends_per_block=2, num_self_attention_heads=2,
                      num_cross_attention_heads=1),
    'swin': dict(image_size=32, patch_size=2, embed_dim=16, depths=[1, 2, 1], num_heads=[2, 2, 4], window_size=2),
    'swinv2': dict(image_size=32, patch_size=2, embed_dim=16, depths=[1, 2, 1], num_heads=[2, 2, 4], window_size=2,
                   pretrained_window_sizes=[0, 0, 0]),
    'textnet': dict(image_size=[64, 64]),
    # text
    'cohere_compass_text': dict(rope_parameters={
        kind: dict(rope_type='default', rope_theta=10000.0) for kind in ('full_attention', 'sliding_attention')}),
    # DbrxAttention reads attn_config.rope_theta, which DbrxAttentionConfig does not define
    # DbrxAttention clamps with clip_qkv, None by default
    'dbrx': dict(attn_config=dict(rope_theta=10000.0, clip_qkv=8.0)),
    # sliding layers (the third kept) need head_dim = qk_nope_head_dim + qk_rope_head_dim
    'dots3_note': dict(per_layer_config={2: dict(num_attention_heads=2, num_key_value_heads=2, qk_nope_head_dim=8)}),
    'dots3_note_text': dict(per_layer_config={2: dict(num_attention_heads=2, num_key_value_heads=2,
                                                      qk_nope_head_dim=8)}),
    # hash-routed MoE layers look experts up by token id (no input embeddings): standard MoE layers only
    'deepseek_v4': dict(mlp_layer_types=['moe', 'moe']),
    'gemma3n': dict(text_config=dict(num_kv_shared_layers=0)),
    'gemma3n_text': dict(num_kv_shared_layers=0),
    # its default config fails its own validation
    'gemma4_assistant': dict(_default=dict(text_config=dict(hidden_size_per_layer_input=0,
                                                            vocab_size_per_layer_input=0)),
                             text_config=dict(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0)),
    'gpt_neo': dict(attention_types=[[['global', 'local'], 1]]),
    # per-layer lists of layer indices: a sliding layer, an indexer, an indexed layer reading the indexer's K/V
    'kolibri1_1': dict(num_hidden_layers=3, layer_types=['sliding_attention', 'indexed_attention', 'indexed_attention'],
                       index_layers=[1], kv_source_layers=[0, 1, 1], mlp_only_layers=[0]),
    'longformer': dict(attention_window=4),
    # the 2-D position embeddings: 4 coordinates and 2 shapes filling the width
    'layoutlmv3': dict(coordinate_size=10, shape_size=12),
    'lilt': dict(hidden_size=96),
    'lfm2_moe': dict(layer_types=['conv', 'full_attention'], num_dense_layers=1),
    'longcat_flash': dict(head_dim=8, num_key_value_heads=4),
    'reformer': dict(axial_pos_embds=False),
    'causal_lm:reformer': dict(is_decoder=True),
    'zaya': dict(num_experts_per_tok=1),
    'xmod': dict(default_language='en_XX'),
}


def _fields(cls):
    """The names a config class takes: its dataclass fields and ``__init__``'s parameters."""
    names = {field.name for field in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    try:
        names |= set(inspect.signature(cls.__init__).parameters) - {'self', 'kwargs', 'args'}
    except (TypeError, ValueError):
        pass
    return names


def _is_config(value):
    from transformers import PretrainedConfig
    return isinstance(value, PretrainedConfig)


def _get(config, name):
    """``config.name``, or what is stored under it where reading it raises (a per-layer attribute of a
    heterogeneous config)."""
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001
        return vars(config).get(name)


def _layers(default):
    for name in ('num_hidden_layers', 'num_layers', 'n_layer', 'n_layers'):
        value = _get(default, name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _scaled(value, old, new):
    """A per-layer override ``value`` of a size whose global value goes from ``old`` to ``new``."""
    if type(value) is int and type(old) is int and type(new) is int and old:
        return max(1, round(value * new / old))
    return value


def shrink(default, extra=None, variant=None):
    """Keyword arguments of ``type(default)`` for a tiny model like ``default`` (see the module doc); ``variant(cls,
    kwargs) -> kwargs`` changes those of every sub-config (the caller changes the top level's)."""
    cls = type(default)
    fields, aliases = _fields(cls), dict(getattr(cls, 'attribute_map', {}) or {})
    kwargs = {}
    for name, value in SIZES.items():
        target = aliases.get(name, name)
        old = _get(default, target) if target in fields else 0
        if target in fields and (old is None or type(old) is int) and target not in kwargs and target not in KEPT:
            kwargs[target] = value
    # per-layer lists (and per-layer overrides): one layer of each kind, in their first order, at least two layers
    layers = _layers(default)
    per_layer = [name for name in sorted(fields) if isinstance(_get(default, name), (list, tuple))
                 and layers and layers > 2 and len(_get(default, name)) == layers and name not in STAGES]
    spec = vars(default).get('_heterogeneity_spec')  # a heterogeneous config's per-layer overrides
    overrides = {int(k): dict(v) for k, v in (getattr(spec, 'per_layer_overrides', None) or {}).items()}
    keep = list(range(min(2, layers or 0)))
    if layers and layers > 2 and (per_layer or overrides):
        rows = [tuple(repr(_get(default, name)[i]) for name in per_layer) + (repr(overrides.get(i)),)
                for i in range(layers)]
        keep = [i for i in range(layers) if rows[i] not in rows[:i]]
        keep += [i for i in range(layers) if i not in keep][:max(0, 2 - len(keep))]
        keep.sort()
        for name in per_layer:
            values = [_get(default, name)[i] for i in keep]
            kwargs[name] = [SIZES[name]] * len(keep) if name in SIZES and all(type(v) is int for v in values) \
                else values
        for name in ('num_hidden_layers', 'num_layers', 'n_layer', 'n_layers'):
            target = aliases.get(name, name)
            if target in kwargs:
                kwargs[target] = len(keep)
    # per-stage lists: the stage count kept, each stage small
    for name, size in STAGES.items():
        old = _get(default, name) if name in fields else None
        if isinstance(old, (list, tuple)) and old and all(type(v) is int for v in old) and name not in per_layer:
            kwargs[name] = [size(i, v) for i, v in enumerate(old)]
    # special tokens (image, audio placeholders) inside the tiny vocabulary, above the ids of the sample
    specials = [name for name in sorted(fields) if re.fullmatch(r'\w*token_(id|index)', name)
                and name not in ('pad_token_id', 'bos_token_id', 'eos_token_id') and type(_get(default, name)) is int
                and _get(default, name) >= SPECIAL_TOKENS[0]]
    kwargs.update({name: SPECIAL_TOKENS[1] - i for i, name in enumerate(specials)})
    if True:  # TINY's names too (stored where a config does not know them), but no window a config does not know
        for name, value in TINY.items():
            target = aliases.get(name, name)
            old = _get(default, target) if target in fields else None
            if (name not in NOT_WINDOWED or target in fields) and (old is None or type(old) is type(value)) \
                    and target not in KEPT:
                kwargs.setdefault(target, value)
    for name, sub in vars(default).items() if hasattr(default, '__dict__') else ():
        if _is_config(sub) and name in fields:  # a sub-config: the names it knows only
            sub_extra = (extra or {}).get(name)
            sub_kwargs = _known(type(sub), shrink(sub, sub_extra if isinstance(sub_extra, dict) else None, variant))
            sub_kwargs = variant(type(sub), sub_kwargs) if variant else sub_kwargs
            try:
                kwargs[name] = type(sub)(**{**sub_kwargs, **(sub_extra if isinstance(sub_extra, dict) else {})})
            except Exception:  # noqa: BLE001  (a sub-config the shrink breaks stays as it is)
                kwargs[name] = copy.deepcopy(sub)
    for name, value in (extra or {}).items():
        if isinstance(value, dict) and name in kwargs and _is_config(kwargs[name]):
            continue  # merged into the sub-config above
        kwargs[name] = value
    if overrides and 'per_layer_config' not in (extra or {}):
        kwargs['per_layer_config'] = {
            j: {name: _scaled(value, vars(default).get(name), kwargs.get(name)) for name, value in overrides[i].items()}
            for j, i in enumerate(keep) if overrides.get(i)} or None
    return kwargs


def _known(cls, kwargs):
    names = _fields(cls) | set(getattr(cls, 'attribute_map', {}) or {}) | {'per_layer_config'}
    return {name: value for name, value in kwargs.items() if name in names}


def _kv_heads_equal(kwargs):
    """``kwargs`` with as many key-value heads as attention heads (multi-head latent attention wants it), in the
    per-layer overrides too."""
    heads = next((kwargs[k] for k in ('num_attention_heads', 'n_head', 'n_heads', 'num_heads') if k in kwargs), 4)
    kwargs = {**kwargs, **{k: heads for k in KV_HEADS if k in kwargs}}
    if kwargs.get('per_layer_config'):
        kwargs['per_layer_config'] = {
            i: {**layer, **{k: layer.get('num_attention_heads', heads) for k in KV_HEADS if k in layer}}
            for i, layer in kwargs['per_layer_config'].items()}
    return kwargs


# the variants of the shrink tried after the first, in order: (label, kwargs -> kwargs or None to skip)
VARIANTS = (
    ('tiny, known names', lambda cls, kw: _known(cls, kw)),
    ('tiny, derived head_dim', lambda cls, kw: {k: v for k, v in _known(cls, kw).items() if k not in (
        'head_dim', 'd_kv', 'kv_channels')}),
    ('tiny, kv heads = heads', lambda cls, kw: _kv_heads_equal(_known(cls, kw))),
    ('tiny, no window', lambda cls, kw: {**_known(cls, kw), **{k: None for k in NOT_WINDOWED if k in kw}}),
)


def override_of(model_type, zoo=None):
    """The entry of ``OVERRIDES`` for ``model_type`` in ``zoo``."""
    return {**OVERRIDES.get(model_type, {}), **OVERRIDES.get(f'{zoo}:{model_type}', {})}


def default_config(model_type, config_class=None, zoo=None):
    """The default config of ``config_class`` (a model class's own: a text model of a multimodal type takes the
    text config), else of ``model_type``."""
    import transformers

    override = override_of(model_type, zoo).get('_default', {})
    if config_class is not None and config_class is not transformers.PretrainedConfig:
        try:
            return config_class(**override)
        except Exception:  # noqa: BLE001
            pass
    return transformers.AutoConfig.for_model(model_type, **override)


def candidates(model_type, config_class=None, zoo=None):
    """``[(label, config)]``: the configs to try for ``model_type``, in order (see the module doc); a config that
    cannot be made is left out, and when none can, the first error is raised."""
    import transformers

    override = override_of(model_type, zoo)
    made, first_error, seen = [], None, []
    try:
        default = default_config(model_type, config_class, zoo)
    except Exception as error:  # noqa: BLE001
        default, first_error = None, error
    override = {name: value for name, value in override.items() if name != '_default'}
    attempts = []
    if default is not None:
        cls = type(default)
        plain = {name: value for name, value in override.items() if not isinstance(value, dict)}
        for label, variant in (('tiny', None),) + VARIANTS:
            try:
                kwargs = shrink(default, override, variant)
            except Exception as error:  # noqa: BLE001
                first_error = first_error or error
                continue
            attempts.append((label, cls, {**variant(cls, kwargs), **plain} if variant else kwargs))
    legacy_cls = cls if default is not None else None
    attempts.append(('legacy', legacy_cls, {**TINY, **{k: v for k, v in override.items() if not isinstance(v, dict)}}))
    for label, cls, kwargs in attempts:
        key = repr(sorted((name, value.to_dict() if _is_config(value) else value) for name, value in kwargs.items()))
        if key in seen:
            continue
        seen.append(key)
        try:
            kwargs = copy.deepcopy(kwargs)
            config = cls(**kwargs) if cls is not None else transformers.AutoConfig.for_model(model_type, **kwargs)
            made.append((label, config))
        except Exception as error:  # noqa: BLE001
            first_error = first_error or error
    if not made:
        raise first_error
    return made


# timm: the modules of vision-transformer families (timm.models.<module>), and the tokens of a model name that
# name a size, a resolution or pretrained weights rather than an architecture
TIMM_MODULES = (
    'vision_transformer', 'vision_transformer_hybrid', 'vision_transformer_relpos', 'vision_transformer_sam', 'deit',
    'cait', 'beit', 'eva', 'swin_transformer', 'swin_transformer_v2', 'swin_transformer_v2_cr', 'maxxvit', 'coat',
    'crossvit', 'convit', 'levit', 'mvitv2', 'pvt_v2', 'twins', 'tnt', 'volo', 'xcit', 'nest', 'pit',
    'efficientformer', 'efficientformer_v2', 'fastvit', 'hiera', 'hieradet_sam2', 'mobilevit', 'tiny_vit',
    'edgenext', 'gcvit', 'davit', 'focalnet', 'naflexvit', 'byoanet', 'metaformer', 'efficientvit_mit',
    'efficientvit_msra', 'vitamin', 'iformer', 'lowformer', 'shvit', 'nextvit', 'swiftformer', 'visformer',
    'qwen3_vit', 'gemma4_vit', 'deepseek_vit', 'csatv2')
SIZE_WORDS = {
    'tiny', 'small', 'base', 'large', 'huge', 'giant', 'gigantic', 'giantopt', 'enormous', 'medium', 'mediumd',
    'betwixt', 'little', 'dlittle', 'wee', 'dwee', 'pwee', 'dpwee', 'nano', 'pico', 'micro', 'xsmall', 'xxsmall',
    'xlarge', 'xxlarge', 'plus', 's', 'm', 'l', 'b', 't', 'h', 'xs', 'xxs', 'xl', 'n', 'p', 'e', 'patch', 'so',
    'intern', 'in', 'ft', 'k', 'dist', 'distilled', 'miil', 'sam', 'dino', 'laion', 'large2', 'x', 'ti'}
WEIGHT_TAGS = {'in21k', 'in22k', 'in22ft1k', 'in1k', 'in12k', 'laion2b', 'miil', 'dino', 'sam', 'dist', 'distilled'}
TIMM_MAX_PARAMETERS = 30e6
# kwargs tried in order on a variant over TIMM_MAX_PARAMETERS (the first that builds under it is taken)
TIMM_SHRINKS = (
    dict(depth=2), dict(depth=2, embed_dim=192, num_heads=3), dict(depth=2, embed_dim=192, num_heads=4),
    dict(depths=(1, 1, 1, 1)), dict(depths=(1, 1, 1)), dict(depths=(1, 1, 1, 1), embed_dim=64),
    dict(depths=(1, 1, 1, 1), embed_dims=(64, 128, 256, 512)), dict(depths=(1, 1, 1, 1), dims=(64, 128, 256, 512)),
    dict(num_layers=2), dict(layers=(1, 1, 1, 1)), dict(stages=(1, 1, 1, 1)))


# timm models whose registered function takes none of TIMM_SHRINKS (its own arguments clash with them) or whose
# input is too large for the sweep's memory limit: (model class in timm.models or None for the registered function,
# its keyword arguments, the input size)
TIMM_OVERRIDES = {
    'focalnet_large_fl3': ('focalnet.FocalNet', dict(
        depths=(1, 1, 1, 1), embed_dim=64, focal_levels=(3,) * 4, focal_windows=(5,) * 4, use_post_norm=True,
        use_overlap_down=True, layerscale_value=1e-4), None),
    'vit_base_patch16_sapiens2': (None, dict(depth=2, num_kv_heads=6, img_size=224), (3, 224, 224)),
}


def architecture(name):
    """The architecture a timm model name stands for: its family (the first token) and the tokens that are
    neither a size, a resolution, a patch size nor pretrained weights."""
    first, *rest = name.split('_')
    kept = []
    for token in rest:
        if re.fullmatch(r'[a-z]*v\d+', token):  # a version: dinov2, tipsv2, v3
            kept.append(token)
            continue
        if token in WEIGHT_TAGS or re.fullmatch(r'\d+[a-z]?\d*|window\d+(to\d+)?|\d+to\d+', token):
            continue
        letters = re.sub(r'\d+[a-z]?\d*$', '', token) if re.search(r'\d', token) else token
        if letters in SIZE_WORDS or not letters or re.fullmatch(r'(so|p|s|patch)\d+m?\d*', token):
            continue
        kept.append(letters)
    return '_'.join([first] + kept)


def parameter_count(name, **kwargs):
    """The parameter count of ``timm.create_model(name, **kwargs)``, built on the meta device."""
    import timm
    import torch

    with torch.device('meta'):
        model = timm.create_model(name, pretrained=False, **kwargs)
    return sum(p.numel() for p in model.parameters())


def timm_variant(name, limit=TIMM_MAX_PARAMETERS):
    """``(kwargs, parameters)`` for ``name``: none if it is under ``limit`` parameters, else the first of
    ``TIMM_SHRINKS`` that builds under it (or the smallest that builds)."""
    count = parameter_count(name)
    if count <= limit:
        return {}, count
    best = ({}, count)
    for kwargs in TIMM_SHRINKS:
        try:
            smaller = parameter_count(name, **kwargs)
        except Exception:  # noqa: BLE001
            continue
        if smaller <= limit:
            return dict(kwargs), smaller
        if smaller < best[1]:
            best = (dict(kwargs), smaller)
    return best


def timm_architectures(modules=TIMM_MODULES):
    """``{model name: 'module:architecture'}``: timm's vision-transformer models (``modules``), one per
    architecture, the one with the fewest parameters (counted on the meta device); test models left out."""
    import timm
    from timm.models import _registry

    best = {}
    for name in timm.list_models():
        module = _registry._model_to_module.get(name)
        if module not in modules or name.startswith('test_'):
            continue
        key = f'{module}:{architecture(name)}'
        try:
            count = parameter_count(name)
        except Exception:  # noqa: BLE001
            count = float('inf')
        if key not in best or count < best[key][1]:
            best[key] = (name, count)
    return {name: key for key, (name, _) in sorted(best.items())}
