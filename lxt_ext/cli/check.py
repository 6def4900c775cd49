"""``lxt-ext check``: the conservation check (``lxt_ext.diagnostics.conservation``) of a model under a
composite, as a table of relevance in vs out per module, naming the first module where relevance
leaks, explodes or turns NaN/Inf. For people porting an architecture: CP-LRP by default (AttnLRP's
softmax rule does not conserve by design) and the model's biases and added embeddings zeroed for the
check (``--keep-bias`` keeps them)."""
import json
import os
import sys
import warnings

import torch

from .._docstrings import shared_parameters

HELP = 'check relevance conservation per module (where does relevance leak, explode or turn NaN?)'

EPILOG = '''models: embedded (lxt_ext's trained ViT, on its sample images), a torchvision model (vit_b_16, ...;
random weights unless --weights), timm:<name>, or a local Hugging Face folder: an image classifier, or a
text model (explained w.r.t. its input embeddings; its tokenizer reads --text if the folder has one, else
random tokens). A text model folder without weights is built from its config with random weights.
Exit status: 0 conserved, 1 a module leaks, explodes or turns NaN/Inf, 2 bad arguments.'''


@shared_parameters('command_parser')
def add_arguments(parser):
    """Add the arguments of ``lxt-ext check``."""
    from .arguments import add_model_arguments
    from .models import COMPOSITES

    parser.epilog = EPILOG
    add_model_arguments(parser, model_help='model spec (default: embedded)',
                        seed_help='seed of random weights and random inputs', positional=True)
    parser.add_argument('--composite', choices=sorted(COMPOSITES) + ['language_transformer'],
                        help='default: vit_gamma for vision transformers, language_transformer for text models, '
                        'epsilon_gamma_box for CNNs')
    parser.add_argument('--attention', choices=('cp', 'attnlrp'), default='cp',
                        help='attention rule (default cp: AttnLRP does not conserve by design)')
    parser.add_argument('--gamma', type=float,
                        help='language_transformer: fused gamma with this gamma on Linear layers (default: epsilon)')
    parser.add_argument('--epsilon', type=float)
    parser.add_argument('--target', type=int, help='class to explain (default: the top class)')
    parser.add_argument('--batch-size', type=int, default=1, help='inputs checked at once')
    parser.add_argument('--text', help='text models: the text to check (default: random tokens)')
    parser.add_argument('--tokens', type=int, default=16, help='text models: number of random tokens')
    parser.add_argument('--rtol', type=float, default=1e-3,
                        help='allowed leak per module, relative to max(|R_out|, |output relevance|)')
    parser.add_argument('--explode', type=float, default=1e3,
                        help='sum |R_in| above this many times sum |R_out| (or |output relevance|) explodes')
    parser.add_argument('--keep-bias', action='store_true', help='keep biases and added embeddings')
    parser.add_argument('--zero', nargs='*', default=(), metavar='PATTERN',
                        help='more parameters or buffers to zero for the check (fnmatch patterns of their names)')
    parser.add_argument('--threads', type=int, help='torch CPU threads')


def _error(message):
    print(f'lxt-ext check: error: {message}', file=sys.stderr)
    return 2


def _text_folder(spec):
    """The config of a local Hugging Face text model folder, or None for anything else."""
    path = os.path.join(spec, 'config.json')
    if not os.path.isfile(path):
        return None
    with open(path, encoding='utf-8') as file:
        config = json.load(file)
    return config if 'vocab_size' in config and 'image_size' not in config else None


def _load_text(folder, seed):
    """``(model, forward)`` of a local Hugging Face text model folder (random weights from its config
    when it has no weight files)."""
    import transformers

    from .models import ModelError

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    names = config.architectures or []
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), transformers.AutoModel)
    try:
        if any(f.endswith(('.safetensors', '.bin')) for f in os.listdir(folder)):
            # use_kernels=False: offline, no kernels fetched from the Hub (transformers 5.25 asks for them by default)
            model = cls.from_pretrained(folder, local_files_only=True, use_kernels=False)
        else:
            warnings.warn(f'{folder} has no weight files: {getattr(cls, "__name__", cls)} from its config with random '
                          f'weights (seed {seed})')
            torch.manual_seed(seed)
            model = cls.from_config(config) if cls is transformers.AutoModel else cls(config)
    except (OSError, ValueError) as error:
        raise ModelError(f'cannot load the Hugging Face model in {folder}: {error}') from None

    def forward(model, x):
        output = model(inputs_embeds=x)
        logits = getattr(output, 'logits', None)
        return logits if logits is not None else output[0]
    return model.eval(), forward


def _text_input(folder, model, args):
    if args.text:
        import transformers

        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(f'--text needs a tokenizer in {folder}: {error}') from None
        ids = tokenizer([args.text] * args.batch_size, return_tensors='pt')['input_ids']
    else:
        generator = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (args.batch_size, args.tokens),
                            generator=generator)
    with torch.no_grad():
        return model.get_input_embeddings()(ids)


def _image_input(spec, loaded, args):
    if spec == 'embedded':
        from ..data import embedded

        images = embedded.load_samples()[0][:args.batch_size]
    else:
        generator = torch.Generator().manual_seed(args.seed)
        images = torch.rand(args.batch_size, 3, loaded.size, loaded.size, generator=generator)
    return loaded.normalise(images)


@shared_parameters('command_args')
def run(args):
    """Run ``lxt-ext check``: the conservation check of the model under the composite, printed as a table.

    Returns
    -------
    int
        The exit status: 0 conserved, 1 a module leaks, explodes or turns NaN/Inf, 2 bad arguments.
    """
    from ..checks import NonFiniteError
    from ..composites import LanguageTransformer
    from ..diagnostics import conservation
    from ..errors import NotExplainableError
    from .models import ModelError, build_composite, default_composite, fit_warnings, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1 or args.tokens < 1:
        return _error('--batch-size and --tokens must be at least 1')
    text = os.path.isdir(args.model) and _text_folder(args.model)
    try:
        if text:
            if args.composite not in (None, 'language_transformer'):
                return _error(f'{args.model} is a text model: only --composite language_transformer fits')
            model, forward = _load_text(args.model, args.seed)
            composite = LanguageTransformer(attention=args.attention, gamma=args.gamma,
                                            **({} if args.epsilon is None else {'epsilon': args.epsilon}))
            x = _text_input(args.model, model, args)
        else:
            loaded = load_model(args.model, args.weights, args.seed)
            fit_warnings(loaded)
            name = args.composite or default_composite(loaded)
            if name == 'language_transformer':
                return _error(f'{args.model} is an image model: language_transformer does not fit')
            parameters = {'epsilon': args.epsilon}
            if loaded.transformer:
                parameters['attention'] = args.attention
            composite, _ = build_composite(name, loaded, parameters)
            model, forward = loaded.model, loaded.forward
            x = _image_input(args.model, loaded, args)
    except (ModelError, ValueError) as error:
        return _error(str(error))
    except RuntimeError as error:  # the embedded model's files missing or damaged
        if type(error).__name__ != 'EmbeddedModelError':
            raise
        return _error(str(error))
    try:
        report = conservation(model, x, composite, forward=forward, target=args.target,
                              zero_bias=not args.keep_bias, zero=tuple(args.zero), rtol=args.rtol,
                              explode=args.explode)
    except (NotExplainableError, NonFiniteError, ValueError, TypeError) as error:
        return _error(f'{type(error).__name__}: {error}')
    print(report.table())
    if report.zeroed:
        print(f'zeroed for the check: {len(report.zeroed)} parameters/buffers ({", ".join(report.zeroed[:4])}'
              f'{", ..." if len(report.zeroed) > 4 else ""})')
    print(report.summary())
    return 0 if report.first is None else 1
