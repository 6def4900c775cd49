"""Train lxt_ext's embedded default model and write it, with sample images, into the package.

The model is torchvision's ``VisionTransformer`` (64 x 64 images, patch 8, 4 blocks, width 64)
trained from scratch on the procedural shapes of ``lxt_ext.data.shapes`` (seeded): a fixed
training pool, each batch turned/flipped by a random symmetry of the square (which keeps every
class), AdamW with a linear warm-up and a cosine decay. Besides the class loss on the class token,
an auxiliary head (used in training only, not shipped) reads every patch token after the third block
and is trained to tell the object's class on patches the object covers by more than a quarter and
"background" on all others (distractor included): the masks supervise 64 tokens per image instead
of one label, which shortens the plateau a ViT trained from scratch sits on, and the last block
only has to gather the class from the object's tokens into the class token.
Then it measures the accuracy on a held-out set drawn with another seed and writes into
``lxt_ext/data/embedded/``:

- ``model.pt``: the float32 ``state_dict`` (``torch.save``; load with ``weights_only=True``);
- ``model.json``: the architecture, class names, the input normalisation, the held-out accuracy
  and how the training ran (steps, seconds, CPU seconds, load average);
- ``samples/NN_<class>.png`` (held-out images, two or three per class), ``masks/NN_<class>.png``
  (their object masks, white = object) and ``samples.json`` (file names and labels);

and sets ``WEIGHTS_SHA256`` in ``lxt_ext/data/embedded.py`` to the new file's sha256.

    nice -n 10 python python/training/train_default_model.py

"Reproduces" means the held-out accuracy within one point; the weights are not bitwise the same
across machines or thread counts.
"""
import argparse
import hashlib
import json
import math
import os
import re
import resource
import sys
import time

# Idle OpenMP threads sleep instead of spinning: on shared cores spinning threads slowed training several-fold
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
import torch  # noqa: E402  (after the OpenMP setting, which is read when torch loads)
from torchvision.models import VisionTransformer

from lxt_ext.data import shapes  # noqa: E402

# The checkout's lxt_ext/data (python/training/ is two below the root), not an installed copy's: the
# model, its samples and the sha256 line are source files of the repository.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, 'lxt_ext', 'data')
ARCHITECTURE = dict(image_size=shapes.IMAGE_SIZE, patch_size=8, num_layers=4, num_heads=4,
                    hidden_dim=64, mlp_dim=128, num_classes=len(shapes.CLASSES))
PATCH_LOSS_LAYER = 2  # the auxiliary patch head reads the tokens after the third of the four blocks


def dihedral(images, grids, generator):
    """Each image and its patch grid turned by the same random multiple of 90 degrees and flipped
    (left-right) with probability 1/2: the symmetries of the square, which keep every class."""
    turns = torch.randint(4, (len(images),), generator=generator)
    flips = torch.rand(len(images), generator=generator) < 0.5
    images_out, grids_out = torch.empty_like(images), torch.empty_like(grids)
    for k in range(4):
        for flip in (False, True):
            rows = (turns == k) & (flips == flip)
            for source, target in ((images, images_out), (grids, grids_out)):
                turned = torch.rot90(source[rows], k, dims=(-2, -1))
                target[rows] = turned.flip(-1) if flip else turned
    return images_out, grids_out


def patch_targets(masks, labels):
    """(N, grid, grid) per patch token: the class where the object covers more than a quarter of the
    patch, else the extra class ``len(CLASSES)`` (background, distractor)."""
    patch = ARCHITECTURE['patch_size']
    cover = torch.nn.functional.avg_pool2d(masks[:, None].float(), patch)[:, 0]
    return torch.where(cover > 0.25, labels[:, None, None], len(shapes.CLASSES))


def forward_with_tokens(model, x, layer):
    """``(logits, tokens)``: torchvision's ``VisionTransformer`` forward (the same computation as
    ``model(x)`` in train mode) that also returns the tokens after encoder block ``layer``."""
    x = model._process_input(x)
    x = torch.cat([model.class_token.expand(len(x), -1, -1), x], 1)
    encoder = model.encoder
    x = encoder.dropout(x + encoder.pos_embedding)
    for index, block in enumerate(encoder.layers):
        x = block(x)
        if index == layer:
            tokens = x
    return model.heads(encoder.ln(x)[:, 0]), tokens


def accuracy(model, images, labels, mean, std, batch_size=500):
    with torch.no_grad():
        predicted = torch.cat([model((images[i:i + batch_size] - mean) / std).argmax(1)
                               for i in range(0, len(images), batch_size)])
    return (predicted == labels).float().mean().item()


def balanced_indices(labels, count, classes):
    """``count`` row indices, classes in turn (0, 1, ..., 0, 1, ...), each the next unused row of its class."""
    pools = [(labels == k).nonzero().flatten().tolist() for k in range(classes)]
    return [pools[i % classes].pop(0) for i in range(count)]


def train(args):
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start, cpu_start = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    load_start = os.getloadavg()[0]

    images, masks, labels = shapes.generate(args.train_size, seed=args.seed)
    mean = images.mean((0, 2, 3)).round(decimals=3).view(1, 3, 1, 1)
    std = images.std((0, 2, 3)).round(decimals=3).view(1, 3, 1, 1)
    images = (images * 255).round().to(torch.uint8)  # as the shipped PNGs; a quarter of the memory
    grids = patch_targets(masks, labels)
    del masks
    model = VisionTransformer(**ARCHITECTURE)
    patch_head = torch.nn.Sequential(torch.nn.LayerNorm(ARCHITECTURE['hidden_dim']),
                                     torch.nn.Linear(ARCHITECTURE['hidden_dim'], len(shapes.CLASSES) + 1))
    parameters = list(model.parameters()) + list(patch_head.parameters())
    optimiser = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: min((step + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, args.steps - warmup))))))
    generator = torch.Generator().manual_seed(args.seed + 1)
    order = torch.randperm(args.train_size, generator=generator)
    position, correct, seen = 0, 0.0, 0.0
    model.train()
    bar = tqdm(range(args.steps), desc='training', unit='step', file=sys.stderr, mininterval=10)
    for _ in bar:
        if position + args.batch_size > len(order):
            order, position = torch.randperm(args.train_size, generator=generator), 0
        rows = order[position:position + args.batch_size]
        position += args.batch_size
        x, grid = dihedral(images[rows].float() / 255, grids[rows], generator)
        logits, middle = forward_with_tokens(model, (x - mean) / std, PATCH_LOSS_LAYER)
        loss = torch.nn.functional.cross_entropy(logits, labels[rows])
        patch_loss = torch.nn.functional.cross_entropy(patch_head(middle[:, 1:]).flatten(0, 1), grid.flatten())
        optimiser.zero_grad(set_to_none=True)
        (loss + args.patch_loss * patch_loss).backward()
        optimiser.step()
        schedule.step()
        # running (exponentially weighted) training accuracy, free from the logits of the step
        correct = 0.98 * correct + (logits.argmax(1) == labels[rows]).float().mean().item()
        seen = 0.98 * seen + 1
        bar.set_postfix(loss=f'{loss.item():.3f}', patch_loss=f'{patch_loss.item():.3f}',
                        train_accuracy=f'{correct / seen:.3f}', refresh=False)
    model.eval()
    seconds = time.perf_counter() - start
    cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = cpu_end.ru_utime + cpu_end.ru_stime - cpu_start.ru_utime - cpu_start.ru_stime

    held_images, held_masks, held_labels = shapes.generate(args.held_out, seed=args.seed + 2)
    held_accuracy = accuracy(model, held_images, held_labels, mean, std)
    training = dict(steps=args.steps, batch_size=args.batch_size, train_size=args.train_size, lr=args.lr,
                    weight_decay=args.weight_decay, patch_loss=args.patch_loss, seed=args.seed, threads=args.threads,
                    seconds=round(seconds, 1), cpu_seconds=round(cpu_seconds, 1),
                    load_average_1min=[round(load_start, 2), round(os.getloadavg()[0], 2)])
    print(f'held-out accuracy {held_accuracy:.4f} on {args.held_out} images; trained in {seconds:.0f} s '
          f'({cpu_seconds:.0f} CPU s, load {load_start:.2f} -> {os.getloadavg()[0]:.2f})')
    return model, mean, std, held_accuracy, training, (held_images, held_masks, held_labels)


def write(args, model, mean, std, held_accuracy, training, held_out):
    folder = os.path.join(PACKAGE, 'embedded')
    for sub in ('samples', 'masks'):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        for name in os.listdir(os.path.join(folder, sub)):
            os.remove(os.path.join(folder, sub, name))
    weights = os.path.join(folder, 'model.pt')
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    with open(weights, 'rb') as file:
        sha256 = hashlib.sha256(file.read()).hexdigest()

    images, masks, labels = held_out
    samples = []
    for index, row in enumerate(balanced_indices(labels, args.samples, len(shapes.CLASSES))):
        name = f'{index:02d}_{shapes.CLASSES[labels[row]]}.png'
        shapes.to_png(images[row], os.path.join(folder, 'samples', name))
        shapes.to_png(masks[row], os.path.join(folder, 'masks', name))
        samples.append(dict(image=f'samples/{name}', mask=f'masks/{name}', label=int(labels[row])))
    with open(os.path.join(folder, 'samples.json'), 'w') as file:
        json.dump(samples, file, indent=1)
    metadata = dict(architecture=ARCHITECTURE, classes=list(shapes.CLASSES),
                    mean=[round(v, 3) for v in mean.flatten().tolist()], std=[round(v, 3) for v in std.flatten().tolist()],
                    weights='model.pt', dtype='float32',
                    held_out_accuracy=round(held_accuracy, 4), held_out_images=args.held_out,
                    held_out_seed=args.seed + 2, training=training)
    with open(os.path.join(folder, 'model.json'), 'w') as file:
        json.dump(metadata, file, indent=1)

    module = os.path.join(PACKAGE, 'embedded.py')
    with open(module) as file:
        source = file.read()
    source, count = re.subn(r"^WEIGHTS_SHA256 = '[0-9a-f]*'$", f"WEIGHTS_SHA256 = '{sha256}'", source, flags=re.M)
    if count != 1:
        raise RuntimeError(f"{module} has no line WEIGHTS_SHA256 = '...' to update; the sha256 is {sha256}")
    with open(module, 'w') as file:
        file.write(source)
    print(f'wrote {weights} ({os.path.getsize(weights) / 1e6:.2f} MB, sha256 {sha256}) and {len(samples)} samples')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--steps', type=int, default=1500)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--train-size', type=int, default=30000)
    parser.add_argument('--held-out', type=int, default=2000)
    parser.add_argument('--lr', type=float, default=2e-3)
    parser.add_argument('--patch-loss', type=float, default=1.0,
                        help='weight of the auxiliary per-patch loss (0: the class label alone)')
    parser.add_argument('--weight-decay', type=float, default=0.05)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--samples', type=int, default=12)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--dry-run', action='store_true', help='train and report, write nothing')
    args = parser.parse_args()
    result = train(args)
    if not args.dry_run:
        write(args, *result)


if __name__ == '__main__':
    main()
