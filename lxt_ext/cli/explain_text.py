"""``lxt-ext explain-text``: a local Hugging Face causal language model generates (or is given) an answer to a
prompt, and the answer is explained from one forward (``lxt_ext.attribution.generation``): an HTML page with the
prompt and answer as a heatmap, each generated token's own row on hover or click (``page.html#token=5`` opens
on generated token 5, counted from 0), and the numbers as files."""
import csv
import json
import os
import sys

import torch

from .._docstrings import shared_parameters

HELP = 'generate an answer with a local Hugging Face language model and explain it (HTML heatmap, matrix, tokens)'

EPILOG = '''output folder: page.html (the heatmap: the whole answer; hover or click a generated token for its
row; page.html#token=N opens on generated token N, counted from 0), matrix.csv (one row per generated token,
one column per token: its relevance for that generated token), tokens.json (ids, token strings, prompt length,
the whole answer's relevance, each generated token's score and log-probability, the settings). These three
files are rewritten by a rerun; nothing else in the folder is touched. The prompt is tokenised with the
tokenizer's special tokens (a trailing end/separator token is dropped: the answer continues the text); no chat
template is applied. Exit status: 0 explained, 2 bad arguments, model files or input.'''

SCORES = ('logit', 'log_prob', 'contrastive')
FILES = ('page.html', 'matrix.csv', 'tokens.json')


@shared_parameters('command_parser')
def add_arguments(parser):
    """Add the arguments of ``lxt-ext explain-text``."""
    parser.epilog = EPILOG
    parser.add_argument('model', help='a local Hugging Face causal language model folder (config.json, weights, '
                        'tokenizer files); read offline')
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument('--prompt', help='the prompt text')
    prompt.add_argument('--prompt-file', help='a UTF-8 text file holding the prompt')
    parser.add_argument('--max-new-tokens', type=int, default=32, help='tokens to generate (greedy; default 32)')
    parser.add_argument('--target', help='explain this continuation instead of generating one (tokenised '
                        'without special tokens; byte-level BPE models want its leading space, e.g. " Paris")')
    parser.add_argument('--attention', choices=('attnlrp', 'cp'), default='attnlrp',
                        help='AttnLRP (default) or CP-LRP in attention')
    parser.add_argument('--score', choices=SCORES, default='logit',
                        help='what each generated token\'s relevance explains: its logit (default), its '
                        'log-probability\'s gradient times the logits, or its logit against the mean of the others')
    parser.add_argument('--no-matrix', action='store_true',
                        help='only the whole answer\'s relevance (one backward; no per-token rows)')
    parser.add_argument('--out', default='explained-text', help='output folder (default: explained-text)')
    parser.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'), default='float32')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, help='torch CPU threads')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')


def _error(message):
    print(f'lxt-ext explain-text: error: {message}', file=sys.stderr)
    return 2


def load_language_model(folder, dtype=torch.float32, device='cpu'):
    """A local Hugging Face causal language model and its tokenizer (``local_files_only``: nothing downloaded).

    Parameters
    ----------
    folder : str
        A folder with ``config.json``, the weights and the tokenizer files.
    dtype : torch.dtype
        The parameters' dtype.
    device : str or torch.device
        Where the model goes.

    Returns
    -------
    tuple
        ``(model, tokenizer)``, the model in eval mode.

    Raises
    ------
    ValueError
        Naming what is missing or cannot be loaded.
    """
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ValueError('language models need transformers installed (pip install transformers)') from None
    if not os.path.isdir(folder):
        raise ValueError(f'no such model folder: {folder}')
    if not os.path.isfile(os.path.join(folder, 'config.json')):
        raise ValueError(f'{folder} is no Hugging Face model folder (no config.json)')
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f'cannot load the tokenizer in {folder}: {error}') from None
    try:
        # use_kernels=False: offline, no kernels fetched from the Hub
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_kernels=False, dtype=dtype)
    except (OSError, ValueError) as error:
        raise ValueError(f'cannot load a causal language model from {folder}: {error}') from None
    return model.to(device).eval(), tokenizer


def prompt_ids(tokenizer, text):
    """The prompt's token ids with the tokenizer's special tokens, less a trailing end or separator token.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
        The model's tokenizer.
    text : str
        The prompt.

    Returns
    -------
    torch.Tensor
        ``(tokens,)`` token ids.
    """
    ids = tokenizer(text, return_tensors='pt')['input_ids'][0]
    plain = tokenizer(text, add_special_tokens=False)['input_ids']
    ends = {tokenizer.eos_token_id, tokenizer.sep_token_id} - {None}
    if len(ids) > 1 and int(ids[-1]) in ends and (not plain or plain[-1] != int(ids[-1])):
        ids = ids[:-1]  # added by the tokenizer, not written in the prompt
    return ids


def _write(out, explanation, tokens, settings):
    from ..visualization.generation import save_generation_page
    os.makedirs(out, exist_ok=True)
    g = explanation
    save_generation_page(os.path.join(out, 'page.html'), tokens, g.prompt_length, g.relevance, g.matrix,
                         scores=g.scores, log_probs=g.log_probs, score_name=settings['score'],
                         title=f'{settings["model"]}: {settings["attention"]}, {settings["score"]}')
    if g.matrix is not None:
        with open(os.path.join(out, 'matrix.csv'), 'w', newline='', encoding='utf-8') as file:
            writer = csv.writer(file)
            writer.writerow(['generated_index', 'position', 'token'] + [f'{i}' for i in range(len(tokens))])
            for i, row in enumerate(g.matrix.float().tolist()):
                position = g.prompt_length + i
                writer.writerow([i, position, tokens[position]] + [f'{value:.9g}' for value in row])
    elif os.path.exists(os.path.join(out, 'matrix.csv')):
        os.remove(os.path.join(out, 'matrix.csv'))  # an earlier run's: it would not belong to these tokens
    record = dict(settings, ids=g.ids.tolist(), tokens=tokens, prompt_length=g.prompt_length,
                  relevance=g.relevance.float().tolist(), scores=g.scores.float().tolist(),
                  log_probs=g.log_probs.float().tolist(), matrix='matrix.csv' if g.matrix is not None else None)
    with open(os.path.join(out, 'tokens.json'), 'w', encoding='utf-8') as file:
        json.dump(record, file, ensure_ascii=False, indent=1)


@shared_parameters('command_args')
def run(args):
    """Run ``lxt-ext explain-text``.

    Returns
    -------
    int
        The exit status: 0 explained, 2 bad arguments, model files or input.
    """
    from ..attribution.generation import explain_generation
    from ..checks import NonFiniteError
    from ..composites import LanguageTransformer
    from ..errors import NotExplainableError

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_new_tokens < 1:
        return _error(f'--max-new-tokens must be at least 1, got {args.max_new_tokens}')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        return _error(f'--device {args.device}, but torch sees no CUDA device')
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding='utf-8') as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as error:
            return _error(f'cannot read the prompt file: {error}')
    else:
        text = args.prompt
    if not text:
        return _error('the prompt is empty')
    try:
        model, tokenizer = load_language_model(args.model, getattr(torch, args.dtype), args.device)
    except ValueError as error:
        return _error(str(error))
    prompt = prompt_ids(tokenizer, text).to(args.device)
    if args.target is not None:
        answer = tokenizer(args.target, add_special_tokens=False, return_tensors='pt')['input_ids'][0]
        if len(answer) == 0:
            return _error('--target tokenises to no tokens')
        ids = torch.cat([prompt, answer.to(args.device)])
    else:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.no_grad():
            ids = model.generate(prompt[None], attention_mask=torch.ones_like(prompt)[None], do_sample=False,
                                 max_new_tokens=args.max_new_tokens, pad_token_id=pad)[0]
        if len(ids) == len(prompt):
            return _error('the model generated no tokens')
    try:
        explanation = explain_generation(model, ids, len(prompt), LanguageTransformer(attention=args.attention),
                                         target=args.score, matrix=not args.no_matrix, progress=not args.quiet)
    except (NonFiniteError, ValueError) as error:
        return _error(str(error))
    except NotExplainableError as error:
        return _error(f'{type(model).__name__} cannot be explained exactly: {error}')
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    settings = {'model': os.path.realpath(args.model), 'attention': args.attention, 'score': args.score,
                'dtype': args.dtype, 'target': args.target, 'max_new_tokens': args.max_new_tokens}
    _write(args.out, explanation, tokens, settings)
    answer_text = tokenizer.decode(ids[len(prompt):], skip_special_tokens=False)
    print(f'answer ({len(ids) - len(prompt)} tokens): {answer_text}')
    print(f'relevance of the prompt for the whole answer: {explanation.relevance[:len(prompt)].sum().item():.4g} '
          f'(the answer\'s {args.score}s sum to {explanation.scores.sum().item():.4g})')
    print(f'wrote {os.path.join(args.out, "page.html")} (open it in a browser), matrix.csv, tokens.json')
    return 0
