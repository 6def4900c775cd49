"""Command-line arguments that several ``lxt-ext`` commands share, added by one function each so that a
flag means the same in every command that takes it."""

MODEL_HELP = ('embedded (default: lxt_ext\'s trained ViT), a torchvision model (vit_b_16, resnet50, ...), '
              'timm:<name>, or a local Hugging Face model folder')
WEIGHTS_HELP = 'local state_dict/checkpoint file for torchvision and timm models'
SEED_HELP = 'seed of random weights when --weights is not given'


def add_model_arguments(parser, model_help=MODEL_HELP, weights_help=WEIGHTS_HELP, seed_help=SEED_HELP,
                        positional=False):
    """Add the arguments of :func:`lxt_ext.cli.models.load_model`: the model spec, ``--weights`` and
    ``--seed``; ``args.model``, ``args.weights`` and ``args.seed`` hold them.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        A command's sub-parser.
    model_help : str, optional
        The model spec's help (default: the specs ``load_model`` takes).
    weights_help : str, optional
        The help of ``--weights`` (default: the files it reads).
    seed_help : str, optional
        The help of ``--seed`` (default 0), for a command whose seed also draws its inputs.
    positional : bool, optional
        Take the model spec as an optional positional argument (``lxt-ext check vit_b_16``) instead of
        ``--model``; either defaults to ``embedded``.
    """
    if positional:
        parser.add_argument('model', nargs='?', default='embedded', help=model_help)
    else:
        parser.add_argument('--model', default='embedded', help=model_help)
    parser.add_argument('--weights', help=weights_help)
    parser.add_argument('--seed', type=int, default=0, help=seed_help)
