"""The attribution loop: batches of images through zennit's Gradient attributor, one forward each."""
import sys

import torch

from .models import MEAN, STD


def explained_classes(logits, target=None):
    """The class explained per row of ``logits``: ``target`` for all, or else each row's top class."""
    return logits.argmax(1) if target is None else torch.full((len(logits),), target, device=logits.device)


def one_hot_seed(target=None):
    """zennit's callable ``attr_output``: logits -> the one-hot of :func:`explained_classes`. The
    attributor calls it on the output of its own forward, so no separate forward finds the top class."""
    def seed(logits):
        return torch.nn.functional.one_hot(explained_classes(logits, target), logits.shape[1]).to(logits)
    return seed


def attribute(model, composite, images, target=None, batch_size=8, progress=True):
    """``(relevance N x H x W summed over channels, explained class per image)`` of ``images``
    (N x 3 x H x W in 0..1, normalised with MEAN and STD) for ``target`` (default: each top class)."""
    from tqdm import tqdm
    from zennit.attribution import Gradient

    relevances, classes = [], []
    batches = range(0, len(images), batch_size)
    with Gradient(model, composite, attr_output=one_hot_seed(target)) as attributor:
        for start in tqdm(batches, desc='attributing', unit='batch', disable=not progress, file=sys.stderr):
            logits, relevance = attributor((images[start:start + batch_size] - MEAN) / STD)
            relevances.append(relevance.sum(1))
            classes.append(explained_classes(logits, target))
    return torch.cat(relevances), torch.cat(classes)
