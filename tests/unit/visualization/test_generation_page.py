"""lxt_ext.visualization.generation: a generated text's relevance as one HTML page.

Oracles: Python's HTML parser on the page (what a browser's tokenizer sees: escaping, the JSON blob); the
input numbers and ``token_colours`` of the whole answer and of each row; headless Chromium running the page's
script (the DOM after it ran: ``--dump-dom``) and painting it (a screenshot, inside token boxes that a probe
script reads from the laid-out page). Tokens are the strings of real tokenizer styles (byte-level BPE,
SentencePiece with a byte token, WordPiece with ``[CLS]``/``##``)."""
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import require
from lxt_ext.visualization import clean_tokens, generation_html, save_generation_page
from lxt_ext.visualization.tokens import token_colours

PROMPT = 5
# the tokens of one prompt + answer in each style, and the text of generated token 2 as its caption quotes it
STYLES = {
    'byte_level': (['<|begin_of_text|>', 'The', 'Ġquick', 'Ġbrown', 'Ġfox', 'Ċ', 'Ġjumps', 'Ġover', 'Ġthe', 'Ġlazy',
                    'Ġdog', '.'], "' over'"),
    'sentencepiece': (['<s>', '▁The', '▁quick', '▁brown', '▁fox', '<0x0A>', '▁jump', 's', '▁over', '▁the', '▁lazy',
                       '▁dog'], "'s'"),
    'wordpiece': (['[CLS]', 'the', 'quick', 'brown', 'fox', 'jump', '##ing', 'over', 'the', 'lazy', 'dog', '[SEP]'],
                  "' over'"),
}
SCORES = [3.21, 1.5, 2.75, 0.125, 4.0, -1.25, 2.0]
LOG_PROBS = [-0.52, -1.0, -0.1, -2.5, -0.25, -3.0, -0.75]


def generation(count=12, prompt=PROMPT, seed=1):
    """``(relevance, matrix)`` shaped as explain_generation's: row i zero from position prompt + i on, the
    whole answer the sum of the rows; float32 values (equal from a tensor, an array or a list). Seed 1: both
    the whole answer and row 2 have clearly positive and clearly negative tokens."""
    rng = np.random.default_rng(seed)
    matrix = np.zeros((count - prompt, count), dtype=np.float32)
    for i in range(count - prompt):
        matrix[i, :prompt + i] = rng.normal(size=prompt + i) * (i + 1)
    matrix = matrix.astype(np.float64)
    return matrix.sum(0).astype(np.float32).astype(np.float64), matrix


class Page(HTMLParser):
    """Every element's tag, attributes and text (of it and its children), in the order elements close."""
    VOID = {'br', 'meta', 'img', 'input', 'hr', 'link'}

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.open, self.elements = [], []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.open.append((tag, dict(attrs), []))
        else:
            self.elements.append((tag, dict(attrs), ''))

    def handle_endtag(self, tag):
        while self.open:
            element = self.open.pop()
            self.elements.append((element[0], element[1], ''.join(element[2])))
            if element[0] == tag:
                break

    def handle_data(self, data):
        for element in self.open:
            element[2].append(data)

    def tags(self, tag):
        return [e for e in self.elements if e[0] == tag]

    def by_id(self, name):
        (element,) = [e for e in self.elements if e[1].get('id') == name]
        return element

    @property
    def tokens(self):
        return [(attrs, text) for tag, attrs, text in self.elements
                if tag == 'span' and 'token' in attrs.get('class', '').split()]


def rgb(style):
    """The background colour of an inline style, as the page writes it (``#rrggbb``) or as Chromium serialises
    what the script set (``rgb(r, g, b)``)."""
    match = re.search(r'background-color:\s*(?:#([0-9a-f]{6})|rgb\((\d+),\s*(\d+),\s*(\d+)\))', style)
    assert match, style
    if match.group(1):
        return tuple(int(match.group(1)[k:k + 2], 16) for k in (0, 2, 4))
    return tuple(int(v) for v in match.group(2, 3, 4))


def expected_rgb(values):
    return [tuple(int(round(c * 255)) for c in colour) for colour in token_colours(values)]


def shown_text(token):
    """What a token's element shows: its cleaned text without leading spaces, a line break as ↵."""
    return token.lstrip(' ').replace('\n', '↵')


@pytest.mark.parametrize('style', list(STYLES))
def test_page_holds_every_token_and_its_numbers(style):
    tokens, _ = STYLES[style]
    relevance, matrix = generation()
    page = generation_html(tokens, PROMPT, relevance, matrix, SCORES, LOG_PROBS)
    assert not re.search(r'https?:|<link|<img|url\(|@import|src=', page)  # self-contained
    parsed = Page(page)
    elements = parsed.tokens
    assert [text for _, text in elements] == [shown_text(t) for t in clean_tokens(tokens)]
    for i, (attrs, _) in enumerate(elements):
        assert int(attrs['data-index']) == i
        assert float(attrs['data-relevance']) == relevance[i]  # exactly the input
        part = 'prompt' if i < PROMPT else 'answer'
        assert attrs['data-part'] == part and part in attrs['class'].split()
        assert attrs.get('data-step') == (str(i - PROMPT) if i >= PROMPT else None)
        assert rgb(attrs['style']) == expected_rgb(relevance)[i]  # the whole answer before any script
    # the generated line break (WordPiece has none) breaks the line
    assert page.count('↵</span><br>') == (style != 'wordpiece')
    data = json.loads(parsed.by_id('generation-data')[2])
    assert data['prompt_length'] == PROMPT
    assert data['whole']['relevance'] == relevance.tolist()
    assert [row['relevance'] for row in data['rows']] == matrix.tolist()
    for row, values in zip(data['rows'], matrix):
        assert [tuple(int(c[k:k + 2], 16) for k in (0, 2, 4)) for c in row['colours']] == expected_rgb(values)
    assert data['rows'][2]['caption'] == \
        f'Relevance for generated token 2: {STYLES[style][1]} (logit 2.75, log p -0.1)'
    assert 'whole answer' in parsed.by_id('caption')[2]


def test_token_text_cannot_inject_markup():
    tokens = ['<s>', '▁a', '▁</script><b>x', '▁<!--', '▁&amp;', '▁"q"', "▁'", '▁</SCRIPT>']
    relevance = np.arange(len(tokens), dtype=float) - 3
    matrix = np.tril(np.ones((5, len(tokens))), k=2)
    page = generation_html(tokens, 3, relevance, matrix, title='</title><i>t</i>')
    parsed = Page(page)
    assert [text for _, text in parsed.tokens] == [shown_text(t) for t in clean_tokens(tokens)]
    assert not parsed.tags('b') and not parsed.tags('i')  # no markup from the text
    assert len(parsed.tags('script')) == 2  # the JSON blob and the script, neither cut short
    assert parsed.by_id('generation-data')[1]['type'] == 'application/json'
    blob = parsed.by_id('generation-data')[2]
    assert '<' not in blob and '>' not in blob and '&' not in blob
    data = json.loads(blob)
    assert data['rows'][0]['caption'] == "Relevance for generated token 0: ' <!--'"
    assert data['rows'][4]['caption'] == "Relevance for generated token 4: ' </SCRIPT>'"
    assert parsed.tags('title')[0][2] == '</title><i>t</i>' and parsed.tags('h1')[0][2] == '</title><i>t</i>'


def test_numbers_may_be_tensors_arrays_or_lists():
    tokens, _ = STYLES['byte_level']
    relevance, matrix = generation()
    pages = {generation_html(tokens, PROMPT, convert(relevance), convert(matrix), convert(np.array(SCORES)),
                             convert(np.array(LOG_PROBS)))
             for convert in (np.asarray, lambda a: torch.tensor(a, dtype=torch.float32), lambda a: a.tolist(),
                             lambda a: torch.tensor(a, dtype=torch.float64))}
    assert len(pages) == 1
    page = generation_html(tokens, np.int64(PROMPT), relevance)  # and without the optional numbers
    assert '"rows":null' in page


def test_bad_input_is_named():
    tokens, _ = STYLES['byte_level']
    relevance, matrix = generation()
    with pytest.raises(ValueError, match=r'matrix must be \(answer, tokens\) = \(7, 12\).*got \(12, 7\)'):
        generation_html(tokens, PROMPT, relevance, matrix.T)
    with pytest.raises(ValueError, match=r'matrix must be \(answer, tokens\) = \(6, 12\).*got \(7, 12\)'):
        generation_html(tokens, PROMPT + 1, relevance, matrix)
    for prompt_length in (0, len(tokens), -1, 99):
        with pytest.raises(ValueError, match=rf'1 <= prompt_length < 12 .*got {prompt_length}'):
            generation_html(tokens, prompt_length, relevance, matrix)
    with pytest.raises(TypeError, match='prompt_length must be an integer'):
        generation_html(tokens, 2.5, relevance)
    with pytest.raises(ValueError, match='12 tokens but 11 relevance values'):
        generation_html(tokens, PROMPT, relevance[:-1], matrix)
    with pytest.raises(ValueError, match='relevance must be 1-D'):
        generation_html(tokens, PROMPT, matrix)
    with pytest.raises(ValueError, match=r'scores must hold one value per generated token, shape \(7,\), got \(6,\)'):
        generation_html(tokens, PROMPT, relevance, matrix, scores=SCORES[:-1])
    with pytest.raises(ValueError, match=r'log_probs must hold one value per generated token'):
        generation_html(tokens, PROMPT, relevance, matrix, log_probs=[LOG_PROBS])
    broken = matrix.copy()
    broken[3, 1] = np.nan
    with pytest.raises(ValueError, match='matrix holds NaN'):
        generation_html(tokens, PROMPT, relevance, broken)
    with pytest.raises(ValueError, match='scheme must be one of'):
        generation_html(tokens, PROMPT, relevance, scheme='bpe')


def test_save_writes_the_page_creating_folders(tmp_path):
    tokens, _ = STYLES['wordpiece']
    relevance, matrix = generation()
    path = tmp_path / 'pages' / 'deep' / 'answer.html'
    assert save_generation_page(path, tokens, PROMPT, relevance, matrix, title='fox') == path
    assert path.read_text(encoding='utf-8') == generation_html(tokens, PROMPT, relevance, matrix, title='fox')


def chromium(tmp_path, page, fragment='', *arguments):
    """Headless Chromium on ``page`` (written to a file) opened at ``fragment``; its stdout."""
    binary = shutil.which('chromium') or shutil.which('chromium-browser')
    require(binary is not None, 'chromium is not installed (Debian: apt-get install chromium fonts-dejavu-core)')
    path = tmp_path / 'page.html'
    path.write_text(page, encoding='utf-8')
    command = [binary, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
               '--disable-background-networking', '--disable-component-update', '--disable-sync',
               f'--user-data-dir={tmp_path / "profile"}', '--hide-scrollbars', '--force-device-scale-factor=1',
               *arguments, path.as_uri() + fragment]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout


def dom(tmp_path, page, fragment='', probe=''):
    """The page's DOM after its script (and ``probe``, a script run after it) ran."""
    page = page.replace('</body>', f'<script>{probe}</script></body>') if probe else page
    return Page(chromium(tmp_path, page, fragment, '--virtual-time-budget=2000', '--dump-dom'))


def assert_shows(parsed, values, row):
    """The token elements show ``values`` (colour and value), ``row`` (None: the whole answer) selected."""
    elements = parsed.tokens
    assert [rgb(attrs['style']) for attrs, _ in elements] == expected_rgb(values)
    assert [float(attrs['data-shown-relevance']) for attrs, _ in elements] == list(values)
    selected = [i for i, (attrs, _) in enumerate(elements) if 'data-selected' in attrs]
    assert selected == ([] if row is None else [PROMPT + row])
    assert parsed.tags('body')[0][1]['data-row'] == ('whole' if row is None else str(row))


@pytest.mark.parametrize('style', list(STYLES))
def test_chromium_opens_the_row_the_fragment_names(tmp_path, style):
    tokens, quoted = STYLES[style]
    relevance, matrix = generation()
    # row 2 is not the whole answer: some token changes sign
    assert (np.sign(matrix[2]) * np.sign(relevance) < 0).any()
    page = generation_html(tokens, PROMPT, relevance, matrix, SCORES, LOG_PROBS)
    opened = dom(tmp_path, page, '#token=2')
    assert_shows(opened, matrix[2], 2)
    assert opened.by_id('caption')[2] == f'Relevance for generated token 2: {quoted} (logit 2.75, log p -0.1)'
    assert [text for _, text in opened.tokens] == [shown_text(t) for t in clean_tokens(tokens)]
    default = dom(tmp_path, page)
    assert_shows(default, relevance, None)
    assert 'whole answer' in default.by_id('caption')[2]



def test_chromium_fragment_past_the_answer_opens_the_whole_answer(tmp_path):
    tokens, _ = STYLES['byte_level']
    relevance, matrix = generation()
    parsed = dom(tmp_path, generation_html(tokens, PROMPT, relevance, matrix), '#token=7')  # steps 0..6
    assert_shows(parsed, relevance, None)
    assert parsed.by_id('caption')[2].endswith('(no generated token 7, the answer has 7)')

# Runs after the page's script: hovers, clicks and keys, recording after each what the page shows and the
# address; the last step changes the fragment, whose hashchange writes the record into #probe.
_INTERACTION = r"""
var records = [];
function step(name) { return document.querySelector('.token[data-step="' + name + '"]'); }
function record(what) {
  var selected = document.querySelector('.token[data-selected]');
  records.push([what, document.body.getAttribute('data-row'), location.hash,
                selected ? selected.getAttribute('data-index') : null, document.getElementById('caption').textContent]);
}
function fire(element, type) { element.dispatchEvent(new MouseEvent(type, {bubbles: type !== 'mouseenter'})); }
record('open');
fire(step(1), 'mouseenter'); record('hover 1');
fire(step(1), 'mouseleave'); record('leave 1');
step(3).click(); record('click 3');
fire(step(1), 'mouseenter'); record('hover 1 while 3');
fire(step(1), 'mouseleave'); record('leave 1 while 3');
step(3).click(); record('click 3 again');
step(0).click(); record('click 0');
document.getElementById('whole-answer').click(); record('whole answer');
step(2).dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter'})); record('enter on 2');
window.addEventListener('hashchange', function () {
  record('hash 1');
  var out = document.createElement('pre'); out.id = 'probe'; out.textContent = JSON.stringify(records);
  document.body.appendChild(out);
});
location.hash = '#token=1';
"""


def test_chromium_hover_click_button_and_fragment_change_the_view(tmp_path):
    tokens, _ = STYLES['byte_level']
    relevance, matrix = generation()
    page = generation_html(tokens, PROMPT, relevance, matrix, SCORES, LOG_PROBS)
    parsed = dom(tmp_path, page, '', _INTERACTION)
    records = json.loads(parsed.by_id('probe')[2])
    states = [(what, row, fragment, None if index is None else int(index) - PROMPT)
              for what, row, fragment, index, _ in records]
    assert states == [('open', 'whole', '', None),
                      ('hover 1', '1', '', 1),  # hovering shows the row, the address stays
                      ('leave 1', 'whole', '', None),
                      ('click 3', '3', '#token=3', 3),  # a click selects and links
                      ('hover 1 while 3', '1', '#token=3', 1),
                      ('leave 1 while 3', '3', '#token=3', 3),  # leaving returns to the selected one
                      ('click 3 again', 'whole', '', None),  # clicking it again unselects
                      ('click 0', '0', '#token=0', 0),
                      ('whole answer', 'whole', '', None),  # the button returns to the whole answer
                      ('enter on 2', '2', '#token=2', 2),
                      ('hash 1', '1', '#token=1', 1)]  # a new fragment opens its row
    assert records[3][4].startswith("Relevance for generated token 3: ' the' (logit 0.125")
    assert 'whole answer' in records[0][4] and 'whole answer' in records[6][4]
    assert_shows(parsed, matrix[1], 1)  # the last state, in the DOM's colours too


def test_chromium_without_matrix_shows_only_the_whole_answer(tmp_path):
    tokens, _ = STYLES['sentencepiece']
    relevance, _ = generation()
    page = generation_html(tokens, PROMPT, relevance)
    probe = ("var t = document.querySelector('.token.answer'); t.dispatchEvent(new MouseEvent('mouseenter'));"
             "t.click(); document.body.setAttribute('data-after', location.hash);")
    parsed = dom(tmp_path, page, '#token=1', probe)
    assert_shows(parsed, relevance, None)
    assert 'rows are not available' in parsed.by_id('caption')[2]
    assert 'not available' in parsed.by_id('note')[2]
    assert parsed.tags('body')[0][1]['data-after'] == '#token=1'  # nothing rewrote the address
    assert not [attrs for attrs, _ in parsed.tokens if 'data-step' in attrs]
    assert [attrs['data-part'] for attrs, _ in parsed.tokens] == ['prompt'] * PROMPT + ['answer'] * 7


# Every token's box as laid out, into the title (it changes nothing painted).
_BOXES = ('document.title = JSON.stringify([...document.querySelectorAll(".token")].map(e => {'
          'const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom];}));')


@pytest.mark.parametrize('fragment', ['', '#token=2'], ids=['whole', 'row'])
def test_chromium_screenshot_paints_the_shown_colours(tmp_path, fragment):
    tokens, _ = STYLES['byte_level']
    relevance, matrix = generation()
    shown = matrix[2] if fragment else relevance
    assert (shown > 0).any() and (shown < 0).any()
    page = generation_html(tokens, PROMPT, relevance, matrix, SCORES, LOG_PROBS).replace(
        '</body>', f'<script>{_BOXES}</script></body>')
    boxes = json.loads(dom(tmp_path, page, fragment).tags('title')[0][2])
    chromium(tmp_path, page, fragment, '--window-size=900,600', f'--screenshot={tmp_path / "shot.png"}')
    shot = np.asarray(Image.open(tmp_path / 'shot.png').convert('RGB')).astype(int)
    assert shot.shape[:2] == (600, 900)
    assert len(boxes) == len(tokens) and max(box[3] for box in boxes) < 600
    # the heatmap holds clearly red and clearly blue pixels (the legend's left out)
    top, bottom = int(min(b[1] for b in boxes)), int(max(b[3] for b in boxes))
    left, right = int(min(b[0] for b in boxes)), int(max(b[2] for b in boxes))
    heatmap = shot[top:bottom, left:right]
    red = (heatmap[..., 0] > 240) & (heatmap[..., 1] < 160) & (heatmap[..., 2] < 160)
    blue = (heatmap[..., 2] > 240) & (heatmap[..., 0] < 160) & (heatmap[..., 1] < 160)
    assert red.sum() > 100 and blue.sum() > 100
    # inside each token's box, its own colour is the commonest (the glyphs are thin)
    for (x0, y0, x1, y1), colour, token in zip(boxes, expected_rgb(shown), tokens):
        inside = shot[int(y0) + 2:int(y1) - 2, int(x0) + 1:int(x1) - 1].reshape(-1, 3)
        assert len(inside) >= 40, token
        values, counts = np.unique(inside, axis=0, return_counts=True)
        assert np.abs(values[counts.argmax()] - colour).max() <= 2, (token, values[counts.argmax()], colour)
