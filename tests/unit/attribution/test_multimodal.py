"""lxt_ext.attribution.multimodal: a vision-language model's generated tokens explained w.r.t. the pixels and the
prompt tokens, on tiny random-weight LLaVA, Qwen2-VL, Qwen2.5-VL, PaliGemma, Idefics3, SmolVLM and Gemma 3
(transformers' default configs shrunk by the zoo sweep's helpers, ``python/benchmarks/zoo_configs.py``).

- the answer is generated greedily by the model's own ``generate`` (its input ids, its positions and masks), and the
  explained logits are the logits ``generate`` chose each token from: the one forward over prompt + answer from
  embeddings is the model's own, under the composite too (forward unchanged);
- CP-LRP with biases, position tables and class tokens zeroed conserves: pixel relevance + token relevance = the
  explained logit, for the whole answer and for each generated token; the image placeholders' own embeddings get
  nothing; the pixels get a share;
- AttnLRP runs with the offsets kept and gives finite relevance;
- each generated token's row equals the step-by-step oracle written out here: a forward over the prefix through the
  model's own input-id path (the embedding's output replaced by a leaf), the logit seeded, relevance ``x * grad``;
- heatmaps in the image's grid (Qwen2-VL's flattened patches unflattened, checked against its image processor), one
  per image for several images of several sizes;
- the processor's per-token inputs of the prompt (token types, attention mask) are extended over the answer;
- python/examples/example_vlm.py writes its image and text heatmaps, and its sums add up;
- refusals: a model of no known family, floating inputs besides the pixels, a composite that emits relevance, an
  answer holding the image token."""
import importlib
import os
import sys

import pytest
import torch
import transformers
import zoo_configs  # python/benchmarks is on the path: tests/conftest.py

from lxt_ext.attribution.multimodal import FAMILIES, explain_vision_language, image_heatmaps
from lxt_ext.composites import LanguageTransformer, ViTEpsilon
from lxt_ext.diagnostics.conservation import zeroed
from lxt_ext.errors import NotExplainableError

ANSWER = 3
CLASSES = {'llava': 'LlavaForConditionalGeneration', 'qwen2_vl': 'Qwen2VLForConditionalGeneration',
           'qwen2_5_vl': 'Qwen2_5_VLForConditionalGeneration', 'paligemma': 'PaliGemmaForConditionalGeneration',
           'idefics3': 'Idefics3ForConditionalGeneration', 'smolvlm': 'SmolVLMForConditionalGeneration',
           'gemma3': 'Gemma3ForConditionalGeneration'}
MROPE = {'text_config': {'rope_parameters': {'rope_type': 'default', 'mrope_section': [2, 3, 3],
                                             'rope_theta': 10000.}}}  # head_dim 16: 8 rotary pairs
# what the zoo's generic shrink cannot know: a 16-pixel image, sizes that must match the text model's width
EXTRA = {
    'llava': {'vision_config': {'image_size': 16}},
    'qwen2_vl': MROPE,
    'qwen2_5_vl': {**MROPE, 'vision_config': {'out_hidden_size': 64, 'intermediate_size': 128, 'window_size': 16,
                                              'fullatt_block_indexes': [1]}},
    'paligemma': {'vision_config': {'image_size': 16, 'projection_dim': 64}},
    'idefics3': {'vision_config': {'image_size': 16}, 'scale_factor': 2},
    'smolvlm': {'vision_config': {'image_size': 16}, 'scale_factor': 2},
    'gemma3': {'vision_config': {'image_size': 16}, 'mm_tokens_per_image': 4},
}
KINDS = tuple(CLASSES)
_MODELS = {}


def tiny(kind):
    """``(model, prompt ids, pixel_values, model_inputs)`` of a tiny random ``kind``, built once per session."""
    if kind not in _MODELS:
        default = zoo_configs.default_config(kind)
        config = type(default)(**zoo_configs.shrink(default, EXTRA[kind]))
        torch.manual_seed(0)
        model = getattr(transformers, CLASSES[kind])(config).eval()
        if kind == 'gemma3':  # its projection is zero at initialisation: no image would reach the text
            with torch.no_grad():
                weight = model.model.multi_modal_projector.mm_input_projection_weight
                weight.copy_(torch.randn(weight.shape) / weight.shape[0] ** .5)
        generator = torch.Generator().manual_seed(1)
        image = _image_token(model)
        inputs = {}
        if kind.startswith('qwen'):
            grid = torch.tensor([[1, 4, 6]])  # a 16 x 24 image of 4-pixel patches, 2 x 3 merged tokens
            vision = config.vision_config
            pixels = torch.randn(24, 3 * vision.temporal_patch_size * vision.patch_size ** 2, generator=generator)
            prompt = [1, 5, config.vision_start_token_id] + [image] * 6 + [config.vision_end_token_id, 7, 9, 11]
            inputs = {'image_grid_thw': grid}
        elif kind in ('idefics3', 'smolvlm'):
            pixels = torch.randn(1, 1, 3, 16, 16, generator=generator)
            prompt = [1, 5] + [image] * 4 + [7, 9, 11]  # 16 patches, pixel-shuffled by 2: 4 tokens
        else:
            pixels = torch.randn(1, 3, 16, 16, generator=generator)
            count = 4 if kind == 'gemma3' else 16
            prompt = ([image] * count + [1, 5, 7, 9, 11]) if kind == 'paligemma' else [1, 5] + [image] * count + [7, 9]
        _MODELS[kind] = (model, torch.tensor(prompt), pixels, inputs)
    return _MODELS[kind]


def _image_token(model):
    return getattr(model.config, 'image_token_id', None) or model.config.image_token_index


def own_inputs(kind, model, ids, prompt_length, given):
    """What the processor gives the model's own input-id path besides the ids and pixels."""
    if kind.startswith('qwen'):
        return {**given, 'mm_token_type_ids': (ids == _image_token(model)).int()[None]}
    if kind == 'paligemma':  # the prompt a bidirectional prefix, the answer a causal suffix
        return {'token_type_ids': (torch.arange(len(ids)) >= prompt_length).long()[None]}
    if kind == 'gemma3':
        return {'token_type_ids': (ids == _image_token(model)).long()[None]}
    return dict(given)


def generated(kind, model, prompt, pixels, given):
    """The greedy answer of the model's own ``generate`` and the logits it chose each token from."""
    with torch.no_grad():
        out = model.generate(input_ids=prompt[None], pixel_values=pixels, max_new_tokens=ANSWER,
                             min_new_tokens=ANSWER, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             **own_inputs(kind, model, prompt, len(prompt), given))
    ids = out.sequences[0]
    logits = torch.stack([step[0] for step in out.logits])
    return ids, logits.gather(1, ids[len(prompt):, None])[:, 0]


@pytest.mark.parametrize('kind', KINDS)
def test_cp_conserves_over_pixels_and_tokens(kind):
    model, prompt, pixels, inputs = tiny(kind)
    with zeroed(model):
        ids, logits = generated(kind, model, prompt, pixels, inputs)
        e = explain_vision_language(model, ids, len(prompt), pixels, LanguageTransformer(attention='cp'), matrix=True,
                                    model_inputs=inputs)
    # the one forward from embeddings, under the composite, gives the logits generate chose the tokens from
    torch.testing.assert_close(e.scores, logits, rtol=1e-4, atol=1e-5)
    total = e.relevance.double().sum() + e.pixel_relevance.double().sum()
    assert abs(float(total) - float(logits.double().sum())) <= 1e-4 * float(logits.abs().sum())
    rows = e.matrix.double().sum(1) + e.pixel_matrix.double().flatten(1).sum(1)
    torch.testing.assert_close(rows, logits.double(), rtol=1e-4, atol=1e-6)
    assert float(e.pixel_relevance.abs().sum()) > 1e-3 * float(logits.abs().sum())  # the image takes a share
    assert e.image_tokens.sum() > 0 and torch.equal(e.image_tokens, ids == _image_token(model))
    assert torch.equal(e.relevance[e.image_tokens], torch.zeros(int(e.image_tokens.sum())))
    assert e.pixel_relevance.shape == pixels.shape and e.pixel_matrix.shape == (ANSWER, *pixels.shape)
    torch.testing.assert_close(sum(h.sum() for h in e.heatmaps), e.pixel_relevance.sum(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('kind', KINDS)
def test_attnlrp_runs_with_the_forward_unchanged(kind):
    model, prompt, pixels, inputs = tiny(kind)
    ids, logits = generated(kind, model, prompt, pixels, inputs)  # offsets kept
    e = explain_vision_language(model, ids, len(prompt), pixels, LanguageTransformer(attention='attnlrp'),
                                model_inputs=inputs)
    torch.testing.assert_close(e.scores, logits, rtol=1e-4, atol=1e-5)
    assert e.matrix is None and e.pixel_matrix is None
    assert bool(torch.isfinite(e.relevance).all()) and bool(torch.isfinite(e.pixel_relevance).all())
    assert float(e.pixel_relevance.abs().sum()) > 0 and float(e.relevance.abs().sum()) > 0


def prefix_oracle(kind, model, ids, prompt_length, pixels, given, position, attention):
    """Generated token ``position`` explained on its own: a forward over ``ids[:position]`` through the model's own
    input-id path (the embedding's output replaced by a leaf), its logit seeded, relevance ``x * grad``."""
    prefix = ids[:position]
    embedding = model.get_input_embeddings()
    x = embedding(prefix[None]).detach().requires_grad_()
    p = pixels.detach().clone().requires_grad_()
    handle = embedding.register_forward_hook(lambda module, args, output: x)
    try:
        with LanguageTransformer(attention=attention).context(model), torch.enable_grad():
            logits = model(input_ids=prefix[None], pixel_values=p,
                           **own_inputs(kind, model, prefix, prompt_length, given)).logits
            seed = torch.zeros_like(logits)
            seed[0, -1, ids[position]] = logits[0, -1, ids[position]].detach()
            gx, gp = torch.autograd.grad(logits, (x, p), seed)
    finally:
        handle.remove()
    row = torch.zeros(len(ids))
    row[:position] = (x * gx).sum(-1)[0].detach()
    return row, (p * gp).detach()


@pytest.mark.parametrize('kind,attention', [('llava', 'attnlrp'), ('qwen2_vl', 'attnlrp'), ('qwen2_vl', 'cp'),
                                            ('paligemma', 'attnlrp'), ('gemma3', 'attnlrp')])
def test_each_token_equals_the_prefix_oracle(kind, attention):
    model, prompt, pixels, inputs = tiny(kind)
    ids, _ = generated(kind, model, prompt, pixels, inputs)
    e = explain_vision_language(model, ids, len(prompt), pixels, LanguageTransformer(attention=attention),
                                matrix=True, model_inputs=inputs)
    for i in range(ANSWER):
        row, pixel_row = prefix_oracle(kind, model, ids, len(prompt), pixels, inputs, len(prompt) + i, attention)
        scale = max(float(row.abs().max()), float(pixel_row.abs().max()))
        torch.testing.assert_close(e.matrix[i], row, rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(e.pixel_matrix[i], pixel_row, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(e.relevance, e.matrix.sum(0), rtol=0, atol=1e-6)


def test_heatmaps_lie_in_the_image_grid():
    model, prompt, pixels, inputs = tiny('qwen2_vl')
    vision = model.config.vision_config
    image = torch.randn(1, 3, 16, 24, generator=torch.Generator().manual_seed(3))
    processor = transformers.Qwen2VLImageProcessor(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                                   temporal_patch_size=vision.temporal_patch_size)
    patches, height, width = processor.patchify(image, vision.patch_size, vision.spatial_merge_size,
                                                vision.temporal_patch_size)
    assert (height, width) == (4, 6)
    maps = image_heatmaps(model, patches[0], {'image_grid_thw': torch.tensor([[1, height, width]])})
    assert len(maps) == 1 and maps[0].shape == (16, 24)
    # each pixel's channels summed over the temporal copies of the one frame
    torch.testing.assert_close(maps[0], vision.temporal_patch_size * image[0].sum(0))
    ids, _ = generated('qwen2_vl', model, prompt, pixels, inputs)
    e = explain_vision_language(model, ids, len(prompt), pixels, LanguageTransformer(attention='cp'),
                                model_inputs=inputs)
    assert [tuple(h.shape) for h in e.heatmaps] == [(16, 24)]
    model, prompt, pixels, inputs = tiny('llava')
    maps = image_heatmaps(model, pixels)
    assert len(maps) == 1 and maps[0].shape == (16, 16)
    torch.testing.assert_close(maps[0], pixels[0].sum(0))
    model, _, pixels, _ = tiny('smolvlm')
    assert [tuple(h.shape) for h in image_heatmaps(model, pixels)] == [(16, 16)]


def test_several_images_of_several_sizes():
    model, _, _, _ = tiny('qwen2_vl')
    config = model.config
    grid = torch.tensor([[1, 4, 6], [1, 2, 4]])  # 16 x 24 and 8 x 16 pixels
    pixels = torch.randn(24 + 8, 96, generator=torch.Generator().manual_seed(4))
    image, start, end = config.image_token_id, config.vision_start_token_id, config.vision_end_token_id
    prompt = torch.tensor([1, start] + [image] * 6 + [end, 5, start] + [image] * 2 + [end, 7, 9])
    with zeroed(model):
        ids, logits = generated('qwen2_vl', model, prompt, pixels, {'image_grid_thw': grid})
        e = explain_vision_language(model, ids, len(prompt), pixels, LanguageTransformer(attention='cp'),
                                    model_inputs={'image_grid_thw': grid})
    torch.testing.assert_close(e.scores, logits, rtol=1e-4, atol=1e-5)
    assert [tuple(h.shape) for h in e.heatmaps] == [(16, 24), (8, 16)]
    total = e.relevance.double().sum() + sum(h.double().sum() for h in e.heatmaps)
    assert abs(float(total) - float(logits.double().sum())) <= 1e-4 * float(logits.abs().sum())
    assert all(float(h.abs().sum()) > 0 for h in e.heatmaps)


@pytest.mark.parametrize('kind', ['qwen2_vl', 'paligemma', 'gemma3'])
def test_the_processors_prompt_inputs_are_extended_over_the_answer(kind):
    model, prompt, pixels, inputs = tiny(kind)
    ids, logits = generated(kind, model, prompt, pixels, inputs)
    composite = LanguageTransformer(attention='attnlrp')
    e = explain_vision_language(model, ids, len(prompt), pixels, composite, model_inputs=inputs)
    # as a processor gives them for the prompt: token types, an attention mask
    processor = {**own_inputs(kind, model, prompt, len(prompt), inputs),
                 'attention_mask': torch.ones(1, len(prompt), dtype=torch.long)}
    assert all(v.shape[-1] == len(prompt) for k, v in processor.items() if k != 'image_grid_thw')
    given = explain_vision_language(model, ids, len(prompt), pixels, composite, model_inputs=processor)
    torch.testing.assert_close(given.scores, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(given.relevance, e.relevance, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(given.pixel_relevance, e.pixel_relevance, rtol=1e-4, atol=1e-6)


def test_the_example_writes_its_pictures(tmp_path, monkeypatch, capsys):
    examples = os.path.join(os.path.dirname(__file__), '..', '..', '..', 'python', 'examples')
    monkeypatch.syspath_prepend(os.path.abspath(examples))
    monkeypatch.setattr(sys, 'argv', ['example_vlm.py', '--out', str(tmp_path)])
    importlib.import_module('example_vlm').main()
    names = sorted(os.listdir(tmp_path))
    assert names == ['image.png', 'image_token0.png', 'image_token1.png', 'image_token2.png', 'image_token3.png',
                     'page.html', 'text.html']
    text = (tmp_path / 'text.html').read_text(encoding='utf-8')
    assert text.count('<span') >= 10 and '&lt;image&gt;' not in text  # the placeholders are left to the heatmap
    line = [line for line in capsys.readouterr().out.splitlines() if line.startswith('relevance:')][0]
    summed, explained = float(line.split('= ')[1].split(',')[0]), float(line.split('explained ')[1].split(';')[0])
    assert abs(summed - explained) <= 1e-3 * abs(explained)


def test_refusals_are_named():
    model, prompt, pixels, inputs = tiny('llava')
    ids = torch.cat([prompt, torch.tensor([3, 4])])
    with pytest.raises(ValueError, match='emits relevance'):
        explain_vision_language(model, ids, len(prompt), pixels, ViTEpsilon(attention='cp'))
    with pytest.raises(NotExplainableError, match='pixel_values_videos'):
        explain_vision_language(model, ids, len(prompt), pixels, LanguageTransformer(),
                                model_inputs={'pixel_values_videos': torch.zeros(2, 3)})
    with pytest.raises(ValueError, match='arguments of their own'):
        explain_vision_language(model, ids, len(prompt), pixels, LanguageTransformer(),
                                model_inputs={'input_ids': ids[None], 'pixel_values': pixels})
    torch.manual_seed(0)
    text = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    with pytest.raises(NotExplainableError, match="model type 'llama'"):
        explain_vision_language(text, ids, len(prompt), pixels, LanguageTransformer())
    with pytest.raises(ValueError, match='the answer holds the image token'):
        explain_vision_language(model, torch.cat([prompt, torch.tensor([3, _image_token(model)])]), len(prompt),
                                pixels, LanguageTransformer())
    qwen, prompt, pixels, _ = tiny('qwen2_vl')
    with pytest.raises(ValueError, match='image_grid_thw'):
        explain_vision_language(qwen, torch.cat([prompt, torch.tensor([3])]), len(prompt), pixels,
                                LanguageTransformer())
    assert set(CLASSES) <= set(FAMILIES)
