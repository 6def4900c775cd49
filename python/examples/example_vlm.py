"""A vision-language model's answer explained w.r.t. the image and the prompt: an image heatmap (PNG) and a text
heatmap (HTML), on a tiny random-weight LLaVA (offline: no weights, no tokenizer downloaded).

    python python/examples/example_vlm.py [--out example_vlm]

With a real model the same call takes the processor's output::

    inputs = processor(images=image, text=prompt, return_tensors='pt')
    ids = model.generate(**inputs, max_new_tokens=16, do_sample=False)[0]
    e = explain_vision_language(model, ids, inputs['input_ids'].shape[1], inputs['pixel_values'],
                                LanguageTransformer(attention='attnlrp'))
    tokens = processor.tokenizer.convert_ids_to_tokens(ids)

The random model's answer means nothing; the point is the pictures and the sums: under CP-LRP with the biases and
position tables zeroed, the image's relevance plus the prompt's is the explained logit.
"""
import argparse
import os

import torch
import transformers

from lxt_ext.attribution.multimodal import explain_vision_language, image_heatmaps
from lxt_ext.composites import LanguageTransformer
from lxt_ext.data import embedded
from lxt_ext.diagnostics.conservation import zeroed
from lxt_ext.visualization import save_generation_page, save_heatmap, save_text_heatmap

IMAGE_TOKEN = 63
CLIP_MEAN = torch.tensor([0.4815, 0.4578, 0.4082]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.2686, 0.2613, 0.2758]).view(3, 1, 1)


def tiny_llava(image_size=32, patch_size=4):
    """A two-layer CLIP vision tower and a two-layer LLaMA, random weights."""
    vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    text = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(config).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='example_vlm')
    parser.add_argument('--attention', default='cp', choices=['cp', 'attnlrp'])
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    model = tiny_llava()
    images, _, _, names = embedded.load_samples()
    image = torch.nn.functional.interpolate(images[:1], size=32, mode='bilinear', antialias=True)[0]  # 0..1
    pixel_values = ((image - CLIP_MEAN) / CLIP_STD)[None]
    patches = (32 // 4) ** 2
    prompt = torch.tensor([1, 5] + [IMAGE_TOKEN] * patches + [7, 9, 11, 13])  # "<s> USER: <image> what is it?"

    # offsets zeroed so that the sums can be checked; an explanation of the model as it is leaves them alone
    with zeroed(model), torch.no_grad():
        ids = model.generate(input_ids=prompt[None], pixel_values=pixel_values, max_new_tokens=4, min_new_tokens=4,
                             do_sample=False)[0]
    with zeroed(model):
        e = explain_vision_language(model, ids, len(prompt), pixel_values,
                                    LanguageTransformer(attention=args.attention), matrix=True)

    image_share = float(e.pixel_relevance.sum())
    text_share = float(e.relevance.sum())
    print(f'{names[0]}: answer {ids[len(prompt):].tolist()}, logits {[round(float(s), 4) for s in e.scores]}')
    print(f'relevance: image {image_share:.4f} + text {text_share:.4f} = {image_share + text_share:.4f}, '
          f'explained {float(e.scores.sum()):.4f}; image placeholders {float(e.relevance[e.image_tokens].abs().sum())}')

    save_heatmap(e.heatmaps[0], os.path.join(args.out, 'image.png'), image=image)
    for i, row in enumerate(e.pixel_matrix):  # one image heatmap per generated token
        (heatmap,) = image_heatmaps(model, row)
        save_heatmap(heatmap, os.path.join(args.out, f'image_token{i}.png'), image=image)
    tokens = ['<image>' if int(t) == IMAGE_TOKEN else f'tok{int(t)}' for t in ids]
    keep = ~e.image_tokens  # the placeholders' own relevance is zero: the image's is in the heatmap
    save_text_heatmap([t for t, k in zip(tokens, keep) if k], e.relevance[keep], os.path.join(args.out, 'text.html'),
                      scheme='plain')
    save_generation_page(os.path.join(args.out, 'page.html'), tokens, len(prompt), e.relevance, e.matrix, e.scores,
                         e.log_probs, scheme='plain', title='tiny LLaVA (random weights)')
    print(f'wrote {args.out}/image.png, image_token*.png, text.html, page.html')


if __name__ == '__main__':
    main()
