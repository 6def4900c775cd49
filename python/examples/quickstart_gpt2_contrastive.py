"""The LXT Quickstart's GPT-2 contrastive workflow with lxt_ext instead of LXT's monkey patch: GPT-2 (bfloat16,
eager attention) explained for its top next token *against all the others* (Gu et al. 2018), which keeps
GPT-2's mostly negative logits from flipping the heatmap's sign; ``--attention cp`` is the CP-LRP variant the
Quickstart recommends (Arras et al. 2025) when not explaining contrastively.

    python python/examples/quickstart_gpt2_contrastive.py                  # tiny random-weight GPT-2, offline
    python python/examples/quickstart_gpt2_contrastive.py --model PATH     # a local folder, e.g. openai-community/gpt2
    python python/examples/quickstart_gpt2_contrastive.py --attention cp   # CP-LRP instead of AttnLRP

The swaps: ``monkey_patch(modeling_gpt2)`` becomes ``LanguageTransformer().register(model)``, and LXT's
gradient mask (1 at the chosen token, ``-1/C`` at the other ``C - 1`` logits) becomes
``lxt_ext.attribution.contrastive(max_index)``, the seed as relevance ``z * m`` with ``m`` 1 at the chosen token
and ``-1/(C - 1)`` elsewhere: the relevance sums (CP-LRP, no biases) to ``z_t - mean_{j != t} z_j``. LXT's
``-1/C`` weighs the others by ``(C - 1)/C`` of that (0.99998 for GPT-2's 50257 tokens).
"""
import argparse
import tempfile

import torch
from transformers import AutoTokenizer
from transformers.models.gpt2 import modeling_gpt2

from lxt_ext.attribution import contrastive
from lxt_ext.composites import LanguageTransformer          # instead of: from lxt.efficient import monkey_patch
from lxt_ext.visualization import clean_tokens, save_text_heatmap

PROMPT = """Context: Mount Everest attracts many climbers, including highly experienced mountaineers. There are \
two main climbing routes, one approaching the summit from the southeast in Nepal (known as the standard route) and \
the other from the north in Tibet. While not posing substantial technical climbing challenges on the standard route, \
Everest presents dangers such as altitude sickness, weather, and wind, as well as hazards from avalanches and the \
Khumbu Icefall. As of November 2022, 310 people have died on Everest. Over 200 bodies remain on the mountain and \
have not been removed due to the dangerous conditions. The first recorded efforts to reach Everest's summit were \
made by British mountaineers. As Nepal did not allow foreigners to enter the country at the time, the British made \
several attempts on the north ridge route from the Tibetan side. After the first reconnaissance expedition by the \
British in 1921 reached 7,000 m (22,970 ft) on the North Col, the 1922 expedition pushed the north ridge route up \
to 8,320 m (27,300 ft), marking the first time a human had climbed above 8,000 m (26,247 ft). The 1924 expedition \
resulted in one of the greatest mysteries on Everest to this day: George Mallory and Andrew Irvine made a final \
summit attempt on 8 June but never returned, sparking debate as to whether they were the first to reach the top. \
Tenzing Norgay and Edmund Hillary made the first documented ascent of Everest in 1953, using the southeast ridge \
route. Norgay had reached 8,595 m (28,199 ft) the previous year as a member of the 1952 Swiss expedition. The \
Chinese mountaineering team of Wang Fuzhou, Gonpo, and Qu Yinhua made the first reported ascent of the peak from \
the north ridge on 25 May 1960. \
Question: How high did they climb in 1922? According to the text, the 1922 expedition reached 8,"""


def tiny_gpt2_folder(text=PROMPT, folder=None):
    """A saved random-weight GPT-2 (2 layers, hidden 64) with a byte-level BPE tokenizer trained on ``text``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, PreTrainedTokenizerFast

    raw = ByteLevelBPETokenizer()
    raw.train_from_iterator([text], vocab_size=1000, min_frequency=1, special_tokens=['<|endoftext|>'],
                            show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token='<|endoftext|>', eos_token='<|endoftext|>')
    torch.manual_seed(0)
    end = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                        initializer_range=0.2, bos_token_id=end, eos_token_id=end)
    folder = folder or tempfile.mkdtemp(prefix='tiny_gpt2_')
    modeling_gpt2.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load(path, device='cpu', dtype=torch.bfloat16):
    model = modeling_gpt2.GPT2LMHeadModel.from_pretrained(path, dtype=dtype, attn_implementation='eager',
                                                          local_files_only=True, use_kernels=False).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def explain(model, tokenizer, prompt=PROMPT, attention='attnlrp'):
    """(tokens, token relevance (float32), the contrastive score sum_j z_j m_j, the explained token id)."""
    # deactivate gradients on parameters to save memory
    for param in model.parameters():
        param.requires_grad = False

    composite = LanguageTransformer(attention=attention)   # instead of: monkey_patch(modeling_gpt2)
    composite.register(model)
    try:
        input_ids = tokenizer(prompt, return_tensors='pt', add_special_tokens=True).input_ids.to(model.device)
        input_embeds = model.get_input_embeddings()(input_ids)
        output_logits = model(inputs_embeds=input_embeds.requires_grad_(), use_cache=False).logits

        # the model predicts the wrong number, but we still explain it
        max_logit, max_index = torch.max(output_logits[0, -1, :], dim=-1)

        # --- contrastive explanation (LXT: mask = 1 at max_index, -1/C elsewhere; backward(mask)) ---
        seed = contrastive(max_index)(output_logits)   # z * m: relevance at the last position's logits
        output_logits.backward(seed)
        # -------------------------------

        relevance = (input_embeds.grad * input_embeds).float().sum(-1).detach().cpu()[0]
    finally:
        composite.remove()
    tokens = tokenizer.convert_ids_to_tokens(input_ids[0])
    return tokens, relevance, float(seed.float().sum()), int(max_index)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', help='a local GPT-2 folder (default: a tiny random-weight GPT-2)')
    parser.add_argument('--tiny', action=argparse.BooleanOptionalAction, default=True,
                        help='the tiny random-weight model (the default unless --model is given)')
    parser.add_argument('--attention', choices=['attnlrp', 'cp'], default='attnlrp')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', default='heatmap_contrastive.html', help='.html, .png or .pdf (needs LaTeX)')
    args = parser.parse_args(argv)
    if not args.model and not args.tiny:
        parser.error('give --model PATH or keep --tiny')
    scratch = tempfile.TemporaryDirectory()    # the tiny model's folder, removed at exit
    model, tokenizer = load(args.model or tiny_gpt2_folder(folder=scratch.name), args.device)
    tokens, relevance, score, index = explain(model, tokenizer, attention=args.attention)
    print(f'explained token {tokenizer.convert_ids_to_tokens(index)!r} against the others: '
          f'z_t - mean_(j != t) z_j = {score:.4f}, relevance sum {float(relevance.sum()):.4f}')
    relevance = relevance / relevance.abs().max()
    save_text_heatmap(tokens, relevance, args.out)
    text = clean_tokens(tokens)
    top = relevance.topk(min(5, len(tokens))).indices.tolist()
    print('top tokens:', ', '.join(f'{text[i]!r} {float(relevance[i]):+.2f}' for i in top))
    print('heatmap:', args.out)
    return tokens, relevance


if __name__ == '__main__':
    main()
