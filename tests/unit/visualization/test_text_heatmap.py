"""lxt_ext.visualization's token heatmaps (tokens: text and colours; text: HTML, PNG; latex: PDF).

Oracles: the tokenizers' own decoders and character offsets (tokenizers trained here in milliseconds:
byte-level BPE with GPT-2's byte alphabet, Unigram with Metaspace, BPE with byte fallback as LLaMA 2,
WordPiece as BERT); the page as headless Chromium lays it out (token boxes read by a script in the
page) and paints it (the colours of a screenshot inside those boxes); pdftotext and pdftoppm on the
PDF that pdflatex makes; the sign convention (positive red, negative blue)."""
import json
import re
import shutil
import subprocess
import unicodedata

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from zennit.image import CMAPS

from conftest import require
from lxt_ext.visualization import latex
from lxt_ext.visualization import tokens as token_text
from lxt_ext.visualization import text as text_heatmap
from lxt_ext.visualization import clean_tokens, merge_words, save_text_heatmap, text_html, text_image, text_pdf

CORPUS = ['The quick brown fox jumps over the lazy dog.', 'Relevance flows from the output back to the input.',
          'Hello world, hello tokens!', 'A café in Zürich costs five francs.',
          'Layer-wise relevance propagation explains transformers.'] * 20
# words the vocabularies lack (split into pieces), characters outside the training data (byte tokens),
# a character of four UTF-8 bytes, a line break
TEXT = 'Hello café world.\nThe fox costs 5€ 😀 ok'


def byte_level_bpe():
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tokenizer


def unigram_metaspace():
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(CORPUS + [TEXT], trainers.UnigramTrainer(
        vocab_size=120, unk_token='<unk>', special_tokens=['<unk>'], show_progress=False))
    return tokenizer


def bpe_byte_fallback():
    """LLaMA 2's scheme: Metaspace, and bytes as <0xXX> tokens for characters outside the vocabulary."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token='<unk>'))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=600, special_tokens=['<unk>', *(f'<0x{b:02X}>' for b in range(256))], show_progress=False))
    return tokenizer


def wordpiece():
    tokenizer = Tokenizer(models.WordPiece(unk_token='[UNK]'))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(cleanup=False)
    tokenizer.train_from_iterator(CORPUS, trainers.WordPieceTrainer(
        vocab_size=150, special_tokens=['[UNK]', '[CLS]', '[SEP]'], show_progress=False))
    return tokenizer


TOKENIZERS = {'byte_level': byte_level_bpe, 'unigram': unigram_metaspace, 'byte_fallback': bpe_byte_fallback,
              'wordpiece': wordpiece}


@pytest.fixture(scope='module')
def tokenizers():
    return {name: build() for name, build in TOKENIZERS.items()}


def signed_relevance(count):
    """Alternating signs, varied sizes, a zero: every colour case."""
    values = np.sin(np.arange(count) * 2.1 + .3) * (1 + np.arange(count) % 3)
    values[count // 2] = 0.
    return values


@pytest.mark.parametrize('name', list(TOKENIZERS))
def test_cleaned_tokens_are_the_text_the_tokenizer_decodes(tokenizers, name):
    tokenizer = tokenizers[name]
    encoding = tokenizer.encode(TEXT)
    assert {'byte_level': 'Ġ', 'unigram': '▁', 'byte_fallback': '<0xE2>', 'wordpiece': '##'}[name] in \
        ''.join(encoding.tokens), encoding.tokens  # the artefact this case is about is there
    cleaned = clean_tokens(encoding.tokens)
    assert ''.join(cleaned).lstrip(' ') == tokenizer.decode(encoding.ids, skip_special_tokens=False).lstrip(' ')
    if name != 'wordpiece':  # WordPiece loses the spacing around punctuation; the others are lossless
        assert ''.join(cleaned).lstrip(' ') == TEXT


def test_explicit_scheme_and_special_tokens():
    assert clean_tokens(['<|endoftext|>', 'Hi', 'Ġthere'], scheme='byte_level') == ['<|endoftext|>', 'Hi', ' there']
    assert clean_tokens(['<s>', '▁Hi', '<0x0A>']) == ['<s>', ' Hi', '\n']
    assert clean_tokens(['[CLS]', 'play', '##ing', '[SEP]']) == ['[CLS]', ' play', 'ing', ' [SEP]']
    assert clean_tokens(['a', 'b'], scheme='plain') == ['a', 'b']
    with pytest.raises(ValueError, match='scheme must be one of'):
        clean_tokens(['a'], scheme='bpe')


def expected_words(encoding, relevance):
    """The oracle of merge_words from the tokenizer's character offsets: each token belongs to the
    whitespace-separated word of ``TEXT`` holding its first non-space character (space-only tokens to the
    next word; the line break is a unit of its own)."""
    spans = [(m.start(), m.end()) for m in re.finditer(r'\S+|\n', TEXT)]
    sums = np.zeros(len(spans))
    for (start, end), r in zip(encoding.offsets, relevance):
        first = next((i for i in range(start, end) if TEXT[i] not in ' '), end)
        index = next(k for k, (s, e) in enumerate(spans) if first < e)
        sums[index] += r
    return [TEXT[s:e] for s, e in spans], sums


@pytest.mark.parametrize('name', ['byte_level', 'unigram', 'byte_fallback'])
def test_words_sum_the_relevance_of_their_tokens(tokenizers, name):
    encoding = tokenizers[name].encode(TEXT)
    relevance = signed_relevance(len(encoding.tokens))
    words, sums = merge_words(clean_tokens(encoding.tokens), relevance)
    oracle_words, oracle_sums = expected_words(encoding, relevance)
    assert [w.strip(' ') for w in words] == oracle_words
    np.testing.assert_allclose(sums, oracle_sums, rtol=1e-12, atol=1e-12)
    assert np.isclose(sums.sum(), relevance.sum())


def test_wordpiece_words():
    tokens = ['[CLS]', 'play', '##ing', 'fox', '##es', '.', '[SEP]']
    words, sums = merge_words(clean_tokens(tokens), [1., 2., 3., 4., 5., 6., 7.])
    assert words == ['[CLS]', ' play' + 'ing', ' fox' + 'es', ' .', ' [SEP]']
    assert sums.tolist() == [1., 5., 9., 6., 7.]


def test_colours_are_lxts_bwr_normalised_by_the_largest_magnitude():
    colours = token_text.token_colours(np.array([2., -4., 0., 4.]))
    # zennit's bwr map at (R / max|R| + 1) / 2: red for positive, blue for negative, white at zero
    np.testing.assert_allclose(colours, CMAPS['bwr'](np.array([.75, 0., .5, 1.])))
    assert colours[3].tolist() == [1., 0., 0.] and colours[1].tolist() == [0., 0., 1.]
    np.testing.assert_allclose(token_text.token_colours(np.zeros(3)), CMAPS['bwr'](np.full(3, .5)))


def test_bad_relevance_is_named():
    with pytest.raises(ValueError, match='3 tokens but 2 relevance values'):
        text_html(['a', 'b', 'c'], [1., 2.])
    with pytest.raises(ValueError, match='sum the embedding dimension'):
        text_html(['a', 'b'], np.ones((2, 4)))
    with pytest.raises(ValueError, match='NaN'):
        text_html(['a', 'b'], [1., float('nan')])
    with pytest.raises(ValueError, match='cannot tell the format'):
        save_text_heatmap(['a'], [1.], 'heatmap.svg')


def test_html_is_self_contained(tokenizers):
    encoding = tokenizers['byte_level'].encode(TEXT)
    page = text_html(encoding.tokens, signed_relevance(len(encoding.tokens)), title='<fox & "dog">')
    assert not re.search(r'https?:|<link|<script|<img|url\(|@import|src=', page)
    assert '&lt;fox &amp; &quot;dog&quot;&gt;' in page
    assert page.count('class="token"') == len(encoding.tokens)


# Chromium writes what the test needs into the page title: every token box and its data-relevance.
_PROBE = ('<script>document.title = JSON.stringify([...document.querySelectorAll(".token")].map(e => {'
          'const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom, '
          'parseFloat(e.dataset.relevance), e.textContent];}));</script>')


def chromium(tmp_path, page, *arguments):
    binary = shutil.which('chromium') or shutil.which('chromium-browser')
    require(binary is not None, 'chromium is not installed (Debian: apt-get install chromium fonts-dejavu-core)')
    path = tmp_path / 'page.html'
    path.write_text(page, encoding='utf-8')
    command = [binary, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
               '--disable-background-networking', '--disable-component-update', '--disable-sync',
               f'--user-data-dir={tmp_path / "profile"}', '--hide-scrollbars', '--force-device-scale-factor=1',
               *arguments, path.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.parametrize('words', [False, True], ids=['tokens', 'words'])
def test_chromium_paints_each_token_box_in_the_colour_of_its_relevance_sign(tmp_path, tokenizers, words):
    encoding = tokenizers['byte_level'].encode(TEXT + ' ' + TEXT)
    relevance = signed_relevance(len(encoding.tokens))
    page = text_html(encoding.tokens, relevance, words=words).replace('</body>', _PROBE + '</body>')
    dom = chromium(tmp_path, page, '--dump-dom')
    boxes = json.loads(re.search(r'<title>(.*?)</title>', dom, re.S).group(1).replace('&quot;', '"'))
    expected = merge_words(clean_tokens(encoding.tokens), relevance)[1] if words else relevance
    assert len(boxes) == len(expected)
    np.testing.assert_allclose([box[4] for box in boxes], expected, rtol=1e-5, atol=1e-12)
    chromium(tmp_path, page, '--window-size=800,600', f'--screenshot={tmp_path / "shot.png"}')
    shot = np.asarray(Image.open(tmp_path / 'shot.png').convert('RGB')).astype(int)
    assert max(box[3] for box in boxes) < shot.shape[0], 'the text does not fit the screenshot'
    scale = np.abs(expected).max()
    checked = 0
    for left, top, right, bottom, r, shown in boxes:
        assert right - left > 1 and bottom - top > 5, (shown, left, top, right, bottom)
        inside = shot[int(top) + 1:int(bottom) - 1, int(left) + 1:int(right) - 1].reshape(-1, 3)
        # the box's own colour is the commonest in it (the glyphs are black and thin)
        values, counts = np.unique(inside, axis=0, return_counts=True)
        red, green, blue = values[counts.argmax()]
        if abs(r) < 0.05 * scale:
            continue
        checked += 1
        if r > 0:
            assert red >= 250 and blue < 245 and abs(int(green) - int(blue)) <= 3, (shown, r, (red, green, blue))
        else:
            assert blue >= 250 and red < 245 and abs(int(red) - int(green)) <= 3, (shown, r, (red, green, blue))
        # and as strong as its share of the largest |R| (bwr: the other channels fall linearly to 0)
        assert abs(min(red, blue) / 255 - (1 - abs(r) / scale)) < 0.03, (shown, r, (red, green, blue))
    assert checked >= len(expected) // 2


def boxes_in(image):
    """Masks of the red-ish and blue-ish pixels of an RGB array (int): bwr's positive half keeps red at 255
    and lowers green and blue together, its negative half the other way around."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    red = (r > 240) & (b < r - 40) & (abs(g - b) <= 3)
    blue = (b > 240) & (r < b - 40) & (abs(r - g) <= 3)
    return red, blue


def test_png_boxes_follow_the_tokens(tmp_path):
    image = np.asarray(text_image(['Ġgood', 'Ġbad'], [1., -1.], font_size=24)).astype(int)
    red, blue = boxes_in(image)
    assert red.sum() > 200 and blue.sum() > 200
    assert np.nonzero(red)[1].max() < np.nonzero(blue)[1].min()  # 'good' left of 'bad'
    dark = image.sum(-1) < 150
    for mask in (red, blue):  # black glyphs inside both boxes
        rows, columns = np.nonzero(mask)
        assert dark[rows.min():rows.max(), columns.min():columns.max()].sum() > 20
    path = save_text_heatmap(['Ġgood', 'Ġbad'], [1., -1.], tmp_path / 'heatmap.png', font_size=24)
    assert Image.open(path).size == (800, image.shape[0])


def test_png_wraps_long_text_into_lines(tokenizers):
    encoding = tokenizers['byte_level'].encode(' '.join(CORPUS[:5]))
    image = np.asarray(text_image(encoding.tokens, np.ones(len(encoding.tokens)), width=300))
    coloured = (image[..., 1] < 200).any(1)  # rows holding a (red) box
    runs = np.flatnonzero(np.diff(coloured.astype(int)) == 1)
    assert len(runs) >= 4 and image.shape[1] == 300


def test_png_falls_back_to_pils_font_with_a_warning(monkeypatch):
    monkeypatch.setattr(text_heatmap, 'FONT', '/nonexistent/DejaVuSans.ttf')
    monkeypatch.setattr(text_heatmap, '_matplotlib_font', lambda: None)
    with pytest.warns(UserWarning, match='fonts-dejavu-core'):
        image = np.asarray(text_image(['Ġgood', 'Ġbad'], [1., -1.]))
    red, blue = boxes_in(image.astype(int))
    assert red.any() and blue.any()
    with pytest.raises(FileNotFoundError, match='nope.ttf'):
        text_image(['a'], [1.], font='/nope.ttf')


@pytest.mark.parametrize('engine, package', [('pdflatex', 'texlive-latex-base'), ('lualatex', 'texlive-luatex')])
def test_pdf_through_latex_has_the_words_and_the_colours(tmp_path, tokenizers, engine, package):
    require(shutil.which(engine) is not None, f'{engine} is not installed (Debian: {package})')
    require(shutil.which('pdftotext') and shutil.which('pdftoppm'), 'poppler-utils is not installed')
    text = 'Hello café world. Costs 5% & $3 #1 {x} a_b ~ok <a|b> x--y c\\d' + (' 7€' if engine == 'lualatex' else '')
    tokens = tokenizers['byte_level'].encode(text).tokens
    relevance = np.where(np.arange(len(tokens)) < len(tokens) // 2, 1., -1.)
    path = text_pdf(tokens, relevance, tmp_path / 'heatmap.pdf', words=True, engine=engine)
    words = subprocess.run(['pdftotext', str(path), '-'], capture_output=True, text=True, check=True).stdout
    # pdftotext gives OT1's accents as combining characters, its tilde as the accent's spacing form, and
    # its underscore (a rule) as a space
    words = unicodedata.normalize('NFC', words).replace('\u02dc', '~').replace('_', ' ')
    for word in ['Hello', 'café', 'world.', 'Costs', '5%', '&', '$3', '#1', '{x}', 'a', 'b', '~ok', '<a|b>', 'x--y',
                 'c\\d'] + (['7€'] if engine == 'lualatex' else []):
        assert word in words.split(), (word, words)
    subprocess.run(['pdftoppm', '-r', '100', '-png', '-singlefile', str(path), str(tmp_path / 'page')], check=True)
    image = np.asarray(Image.open(tmp_path / 'page.png').convert('RGB')).astype(int)
    red, blue = boxes_in(image)
    assert red.sum() > 100 and blue.sum() > 100
    assert np.nonzero(red)[1].mean() < np.nonzero(blue)[1].mean()  # first half positive, second negative
    assert image.shape[0] < image.shape[1] / 3  # the page is as high as the text


def test_pdf_names_the_missing_engine(monkeypatch, tmp_path):
    monkeypatch.setattr(latex.shutil, 'which', lambda name: None)
    with pytest.raises(latex.LatexEngineNotFound, match='lualatex, xelatex, pdflatex'):
        text_pdf(['a'], [1.], tmp_path / 'x.pdf')
    with pytest.raises(latex.LatexEngineNotFound, match='xelatex is not installed'):
        text_pdf(['a'], [1.], tmp_path / 'x.pdf', engine='xelatex')


def test_pdflatex_source_replaces_what_it_cannot_set():
    with pytest.warns(UserWarning, match='😀'):
        source = latex.text_latex(['Ġok', 'ĠðŁĺĢ'], [1., -1.])
    assert r'\colorbox[rgb]{0.000,0.000,1.000}{\strut ?}' in source


def test_png_breaks_lines_between_words_not_inside_them():
    """'abc' + 'def' is one word: where 'xxxxxxxx abc' fits a line but 'xxxxxxxx abcdef' does not, the whole
    word moves to the next line (a break at the token boundary would leave 'abc' on the first)."""
    from PIL import ImageFont

    face = ImageFont.truetype(text_heatmap._font(None, 20).path, 20)
    first, word = face.getlength('xxxxxxxx abc'), face.getlength('xxxxxxxx abcdef')
    width = int((first + word) / 2) + 20  # the margins: 10 on each side
    image = np.asarray(text_image(['▁xxxxxxxx', '▁abc', 'def'], [0., 1., -1.], width=width)).astype(int)
    red, blue = boxes_in(image)
    red_rows, blue_rows = np.nonzero(red)[0], np.nonzero(blue)[0]
    assert red_rows.size and blue_rows.size
    assert red_rows.min() == blue_rows.min()  # one line
    dark_rows = np.nonzero((image.sum(-1) < 150)[:, :width // 2])[0]
    assert red_rows.min() > dark_rows.min() + 10  # below the line of 'xxxxxxxx'
