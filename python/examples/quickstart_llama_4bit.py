"""The LXT Quickstart's LLaMA workflow with lxt_ext instead of LXT's monkey patch: a LLaMA loaded in 4-bit
(bitsandbytes nf4, compute dtype bfloat16), parameters frozen, gradient checkpointing (non-reentrant, in
``train()`` mode as transformers requires), the top next-token logit explained w.r.t. the bfloat16 input
embeddings, the relevance accumulated in bfloat16 as the Quickstart advises.

    python python/examples/quickstart_llama_4bit.py                      # tiny random-weight LLaMA, offline
    python python/examples/quickstart_llama_4bit.py --model PATH         # a local LLaMA folder (e.g. Llama-3.2-1B)
    python python/examples/quickstart_llama_4bit.py --attention cp       # CP-LRP instead of AttnLRP
    python python/examples/quickstart_llama_4bit.py --compare-float32    # the same relevance in float32 vs bfloat16

The one swap: ``monkey_patch(modeling_llama)`` becomes ``LanguageTransformer().register(model)``, and since
lxt_ext's output seed is relevance (zennit's convention), ``max_logits.backward()`` becomes
``max_logits.backward(max_logits)``: the relevance starts as the logit, as LXT's does. 4-bit loading needs
bitsandbytes and accelerate (as in LXT).
"""
import argparse
import tempfile

import torch
from transformers import AutoTokenizer, BitsAndBytesConfig
from transformers.models.llama import modeling_llama

from lxt_ext.composites import LanguageTransformer          # instead of: from lxt.efficient import monkey_patch
from lxt_ext.visualization import clean_tokens, save_text_heatmap

PROMPT = """Context: Mount Everest attracts many climbers, including highly experienced mountaineers. \
There are two main climbing routes, one approaching the summit from the southeast in Nepal (known as the standard \
route) and the other from the north in Tibet. While not posing substantial technical climbing challenges on the \
standard route, Everest presents dangers such as altitude sickness, weather, and wind, as well as hazards from \
avalanches and the Khumbu Icefall. As of November 2022, 310 people have died on Everest. Over 200 bodies remain on \
the mountain and have not been removed due to the dangerous conditions. The first recorded efforts to reach \
Everest's summit were made by British mountaineers. As Nepal did not allow foreigners to enter the country at the \
time, the British made several attempts on the north ridge route from the Tibetan side. After the first \
reconnaissance expedition by the British in 1921 reached 7,000 m (22,970 ft) on the North Col, the 1922 expedition \
pushed the north ridge route up to 8,320 m (27,300 ft), marking the first time a human had climbed above 8,000 m \
(26,247 ft). The 1924 expedition resulted in one of the greatest mysteries on Everest to this day: George Mallory \
and Andrew Irvine made a final summit attempt on 8 June but never returned, sparking debate as to whether they were \
the first to reach the top. Tenzing Norgay and Edmund Hillary made the first documented ascent of Everest in 1953, \
using the southeast ridge route. Norgay had reached 8,595 m (28,199 ft) the previous year as a member of the 1952 \
Swiss expedition. The Chinese mountaineering team of Wang Fuzhou, Gonpo, and Qu Yinhua made the first reported \
ascent of the peak from the north ridge on 25 May 1960.
Question: How high did they climb in 1922? According to the text, the 1922 expedition reached 8,"""


def tiny_llama_folder(text=PROMPT, folder=None):
    """A saved random-weight LLaMA (2 layers, hidden 64) with a SentencePiece-style BPE tokenizer trained on
    ``text``: what ``from_pretrained`` reads, offline."""
    from tokenizers import SentencePieceBPETokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    raw = SentencePieceBPETokenizer()
    raw.train_from_iterator([text], vocab_size=1000, min_frequency=1, special_tokens=['<unk>', '<s>', '</s>'],
                        show_progress=False)
    raw.post_processor = TemplateProcessing(single='<s> $A', special_tokens=[('<s>', raw.token_to_id('<s>'))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token='<s>', eos_token='</s>', unk_token='<unk>')
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                         bos_token_id=1, eos_token_id=2, pad_token_id=None)
    folder = folder or tempfile.mkdtemp(prefix='tiny_llama_')
    modeling_llama.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load(path, device='cpu', dtype=torch.bfloat16, quantize=True):
    """The Quickstart's Step 3: the model in 4-bit (nf4, compute ``dtype``) and its tokenizer."""
    quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4',
                                             bnb_4bit_compute_dtype=dtype) if quantize else None
    model = modeling_llama.LlamaForCausalLM.from_pretrained(
        path, device_map=device, dtype=dtype, quantization_config=quantization_config,
        local_files_only=True, use_kernels=False)      # offline; no hub kernels replacing layers
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def explain(model, tokenizer, prompt=PROMPT, attention='attnlrp', checkpointing=True):
    """Steps 4 and 5: (tokens, token relevance (float32), explained logit, its token id)."""
    # Deactivate gradients on parameters
    for param in model.parameters():
        param.requires_grad = False
    # Optionally enable gradient checkpointing (2x forward pass); transformers checkpoints only in train() mode,
    # and the composite switches dropout off
    if checkpointing:
        model.train()
        model.activation_checkpointing_enable({'use_reentrant': False})   # gradient_checkpointing_enable() in 4.x

    composite = LanguageTransformer(attention=attention)   # instead of: monkey_patch(modeling_llama)
    composite.register(model)
    try:
        input_ids = tokenizer(prompt, return_tensors='pt', add_special_tokens=True).input_ids.to(model.device)
        input_embeds = model.get_input_embeddings()(input_ids)
        output_logits = model(inputs_embeds=input_embeds.requires_grad_(), use_cache=False).logits
        max_logits, max_indices = torch.max(output_logits[0, -1, :], dim=-1)
        # lxt_ext's seed is relevance: start it at the logit (LXT: max_logits.backward())
        max_logits.backward(max_logits.detach())
        relevance = (input_embeds.grad * input_embeds).float().sum(-1).detach().cpu()   # bfloat16 product, float32
    finally:
        composite.remove()
    tokens = tokenizer.convert_ids_to_tokens(input_ids[0])
    return tokens, relevance[0], float(max_logits.detach()), int(max_indices)


def to_float32(model):
    """The same 4-bit model computing in float32: its nf4 codes and scales kept, the dequantized weights, the
    4-bit compute dtype and every other parameter (embeddings, norms, the output head) in float32."""
    import bitsandbytes as bnb
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = module.weight.quant_state.dtype = torch.float32
        for param in module.parameters(recurse=False):
            if not isinstance(param, bnb.nn.Params4bit):
                param.data = param.data.float()
    return model


def compare_float32(path, device, attention):
    """The relevance of the bfloat16 run against float32, on the same prompt: (a) the same 4-bit model computing
    in float32 (``to_float32``), (b) the checkpoint loaded with ``dtype=float32`` (4-bit codes quantized from the
    float32 weights, so a few differ). Prints max |R_bf16 - R_fp32| / max |R_fp32| and the Pearson correlation of
    the token relevance; returns them for (a) and (b)."""
    model, tokenizer = load(path, device, torch.bfloat16)
    low = explain(model, tokenizer, attention=attention)
    figures = []
    for label, model in (('same 4-bit model in float32', to_float32(model)),
                         ('loaded with dtype=float32', load(path, device, torch.float32)[0])):
        high = explain(model, tokenizer, attention=attention)
        error = float((low[1] - high[1]).abs().max() / high[1].abs().max())
        correlation = float(torch.corrcoef(torch.stack([low[1], high[1]]))[0, 1])
        print(f'{label}: {len(high[1])} tokens, {attention}, explained logit bf16 {low[2]:.4f} fp32 {high[2]:.4f}; '
              f'max|R_bf16 - R_fp32| / max|R_fp32| = {error:.3g}, correlation {correlation:.4f}')
        figures.append((error, correlation))
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', help='a local LLaMA folder (default: a tiny random-weight LLaMA)')
    parser.add_argument('--tiny', action=argparse.BooleanOptionalAction, default=True,
                        help='the tiny random-weight model (the default unless --model is given)')
    parser.add_argument('--attention', choices=['attnlrp', 'cp'], default='attnlrp')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--no-checkpointing', dest='checkpointing', action='store_false')
    parser.add_argument('--compare-float32', action='store_true')
    parser.add_argument('--out', default='llama_heatmap.html', help='.html, .png or .pdf (needs LaTeX)')
    args = parser.parse_args(argv)
    if not args.model and not args.tiny:
        parser.error('give --model PATH or keep --tiny')
    scratch = tempfile.TemporaryDirectory()    # the tiny model's folder, removed at exit
    path = args.model or tiny_llama_folder(folder=scratch.name)
    if args.compare_float32:
        return compare_float32(path, args.device, args.attention)

    model, tokenizer = load(path, args.device)
    tokens, relevance, logit, index = explain(model, tokenizer, attention=args.attention,
                                              checkpointing=args.checkpointing)
    print(f'explained token {tokenizer.convert_ids_to_tokens(index)!r} (logit {logit:.4f}); '
          f'relevance sum {float(relevance.sum()):.4f}')
    # Normalize relevance between [-1, 1]; save_text_heatmap cleans the tokens itself (clean_tokens)
    relevance = relevance / relevance.abs().max()
    save_text_heatmap(tokens, relevance, args.out)
    text = clean_tokens(tokens)
    top = relevance.topk(min(5, len(tokens))).indices.tolist()
    print('top tokens:', ', '.join(f'{text[i]!r} {float(relevance[i]):+.2f}' for i in top))
    print('heatmap:', args.out)
    return tokens, relevance


if __name__ == '__main__':
    main()
