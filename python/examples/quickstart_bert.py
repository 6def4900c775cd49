"""The LXT Quickstart's BERT classifier workflow with lxt_ext instead of LXT's monkey patch: a BERT sequence
classifier (CoLA: grammatically acceptable or not) explained for its top class logit w.r.t. the input embeddings.

    python python/examples/quickstart_bert.py                  # tiny random-weight BERT, offline
    python python/examples/quickstart_bert.py --model PATH     # a local folder, e.g. JeremiahZ/bert-base-uncased-cola
    python python/examples/quickstart_bert.py --attention cp   # CP-LRP instead of AttnLRP

The one swap: ``monkey_patch(modeling_bert)`` becomes ``LanguageTransformer().register(model)``, and since
lxt_ext's output seed is relevance, ``max_logits.backward()`` becomes ``max_logits.backward(max_logits)``.
"""
import argparse
import tempfile

import torch
import transformers.models.bert.modeling_bert as modeling_bert
from transformers import AutoTokenizer

from lxt_ext.composites import LanguageTransformer          # instead of: from lxt.efficient import monkey_patch
from lxt_ext.visualization import clean_tokens, save_text_heatmap

# The mistake here is in the word "has" which should be "have"
SENTENCE = ('After five years of research, scientists concluded that transformer models work because they has '
            'lots of parameters and math stuff.')


def tiny_bert_folder(text=SENTENCE, folder=None):
    """A saved random-weight BERT classifier (2 layers, hidden 64, CoLA's two labels) with a WordPiece tokenizer
    of ``text``'s words: what ``from_pretrained`` reads, offline."""
    import re
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, PreTrainedTokenizerFast

    words = sorted(set(re.findall(r'\w+|[^\w\s]', text.lower())))    # a WordPiece vocabulary of the text's words
    vocab = {token: i for i, token in enumerate(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + words)}
    raw = BertWordPieceTokenizer(vocab, lowercase=True)                # adds [CLS] ... [SEP]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, cls_token='[CLS]', sep_token='[SEP]',
                                        unk_token='[UNK]', pad_token='[PAD]', mask_token='[MASK]')
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128, initializer_range=0.2,
                        id2label={0: 'unacceptable', 1: 'acceptable'}, label2id={'unacceptable': 0, 'acceptable': 1})
    folder = folder or tempfile.mkdtemp(prefix='tiny_bert_')
    modeling_bert.BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load(path, device='cpu', dtype=torch.float32):
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = modeling_bert.BertForSequenceClassification.from_pretrained(
        path, dtype=dtype, local_files_only=True, use_kernels=False).to(device)
    return model, tokenizer


def explain(model, tokenizer, inputs=SENTENCE, attention='attnlrp'):
    """(tokens, token relevance, the explained logit, its label)."""
    for param in model.parameters():
        param.requires_grad = False

    composite = LanguageTransformer(attention=attention)   # instead of: monkey_patch(modeling_bert)
    composite.register(model)
    try:
        input_ids = tokenizer(inputs, return_tensors='pt', add_special_tokens=True).input_ids.to(model.device)
        inputs_embeds = model.bert.get_input_embeddings()(input_ids)
        logits = model(inputs_embeds=inputs_embeds.requires_grad_(True)).logits
        max_logits, max_indices = torch.max(logits, dim=-1)
        # lxt_ext's seed is relevance: start it at the logit (LXT: max_logits.backward())
        max_logits.backward(max_logits.detach())
        relevance = (inputs_embeds * inputs_embeds.grad).float().sum(-1).detach().cpu()[0]
    finally:
        composite.remove()
    tokens = tokenizer.convert_ids_to_tokens(input_ids[0])
    return tokens, relevance, float(max_logits.detach()), model.config.id2label[max_indices.item()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', help='a local BERT sequence classifier folder (default: a tiny random one)')
    parser.add_argument('--tiny', action=argparse.BooleanOptionalAction, default=True,
                        help='the tiny random-weight model (the default unless --model is given)')
    parser.add_argument('--attention', choices=['attnlrp', 'cp'], default='attnlrp')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--sentence', default=SENTENCE)
    parser.add_argument('--out', default='bert_heatmap.html', help='.html, .png or .pdf (needs LaTeX)')
    args = parser.parse_args(argv)
    if not args.model and not args.tiny:
        parser.error('give --model PATH or keep --tiny')
    scratch = tempfile.TemporaryDirectory()    # the tiny model's folder, removed at exit
    model, tokenizer = load(args.model or tiny_bert_folder(args.sentence, scratch.name), args.device)
    tokens, relevance, logit, label = explain(model, tokenizer, args.sentence, args.attention)
    print(f'The label of the sequence is grammatically: {label} (logit {logit:.4f}, relevance sum '
          f'{float(relevance.sum()):.4f})')
    relevance = relevance / relevance.abs().max()
    save_text_heatmap(tokens, relevance, args.out, words=True)      # WordPiece pieces merged into words
    text = clean_tokens(tokens)
    for name, order in (('top', relevance.topk(3).indices), ('most negative', (-relevance).topk(3).indices)):
        print(f'{name} tokens:', ', '.join(f'{text[i].strip()!r} {float(relevance[i]):+.2f}' for i in order.tolist()))
    print('heatmap:', args.out)
    return tokens, relevance


if __name__ == '__main__':
    main()
