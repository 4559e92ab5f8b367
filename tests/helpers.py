"Synthetic benchmarks for tests (every image carries its split, class and index in its first pixels) and paired statistics."
import json
import os

import numpy as np
import timm
import torch
from PIL import Image, ImageDraw
from fsmtl.data.core import FewShotSplits, Split


def coded_split(n_classes, per_class, split_code, size=32, seed=0):
    "A split whose image i has pixel (0,0) = (split_code, class, i % 256) and random pixels elsewhere."
    rng = np.random.default_rng(seed + split_code)
    labels = np.repeat(np.arange(n_classes), per_class)
    items = rng.integers(0, 256, (len(labels), size, size, 3), dtype=np.uint8)
    items[:, 0, 0] = np.stack([np.full(len(labels), split_code), labels, np.arange(len(labels)) % 256], 1)
    return Split(items, labels, [f"s{split_code}c{c}" for c in range(n_classes)])


def coded_splits(n_train=12, n_val=6, n_test=7, per_class=25, size=32):
    "A small `FewShotSplits` of coded images."
    return FewShotSplits('coded', coded_split(n_train, per_class, 1, size), coded_split(n_val, per_class, 2, size),
                         coded_split(n_test, per_class, 3, size), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))


class Classifier(torch.nn.Module):
    "A timm backbone (`backbone`, as fsmtl's evaluation looks for it) and a linear head over the base classes."
    def __init__(self, n_classes, channels=(16, 32, 32, 64), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = timm.create_model('resnet10t', num_classes=0, channels=channels)
        self.head = torch.nn.Linear(self.backbone.num_features, n_classes)

    def forward(self, x): return self.head(self.backbone(x))


SHAPES = dict(train=['tri', 'hex', 'ring', 'bar'], val=['star', 'cross', 'vbar'], test=['x', 'circle', 'sq'])


def shapes_folder(folder, per_class=20, seed=0):
    "Write a folder benchmark of `SHAPES` (train/val/test folders of class folders of PNGs) to `folder`."
    rng = np.random.default_rng(seed)
    for split, names in SHAPES.items():
        for n in names:
            (folder / split / n).mkdir(parents=True)
            for i in range(per_class): draw_shape(n, rng).save(folder / split / n / f'{i}.png')
    return folder


def draw_shape(name, rng, size=32):
    "A dark shape `name` on a light ground, at a random size, place, rotation and shade."
    im = Image.new('L', (size, size), int(rng.integers(200, 256)))
    d, fg = ImageDraw.Draw(im), int(rng.integers(0, 60))
    r = rng.uniform(8, 13); cx, cy = rng.uniform(r + 1, size - r - 1, 2); rot = rng.uniform(0, 2 * np.pi)
    if name in ('tri', 'sq', 'hex', 'star'):
        n = {'tri': 3, 'sq': 4, 'hex': 6, 'star': 10}[name]
        rad = [r * (0.45 if name == 'star' and i % 2 else 1) for i in range(n)]
        d.polygon([(cx + q * np.cos(rot + 2 * np.pi * i / n), cy + q * np.sin(rot + 2 * np.pi * i / n))
                   for i, q in enumerate(rad)], fill=fg)
    elif name == 'circle': d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif name == 'ring': d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=3)
    else:
        for t in {'cross': [0, np.pi / 2], 'x': [np.pi / 4, 3 * np.pi / 4], 'bar': [0], 'vbar': [np.pi / 2]}[name]:
            d.line([(cx - r * np.cos(t), cy - r * np.sin(t)), (cx + r * np.cos(t), cy + r * np.sin(t))], fill=fg, width=4)
    return im.convert('RGB')


# The seed of the tests that train: `FSMTL_TEST_SEED=1 make test` checks that their margins do not hang on one seed.
TEST_SEED = int(os.environ.get('FSMTL_TEST_SEED', '0'))


def paired_gain(better,  # per-episode accuracies of the method that should win
                worse):  # per-episode accuracies of the other, on the same episodes in the same order
    "Mean and 95% CI half-width (1.96 std / sqrt(n), ddof=1) of the per-episode difference `better - worse`."
    d = np.asarray(better, np.float64) - np.asarray(worse, np.float64)
    assert d.ndim == 1 and len(d) > 1, "a paired comparison needs two accuracies per episode of at least two episodes"
    return float(d.mean()), float(1.96 * d.std(ddof=1) / np.sqrt(len(d)))


def assert_gain(name,           # what is compared, for the message and the margins file
                better, worse):  # per-episode accuracies on the same episodes
    "Assert that `better` beats `worse` on the same episodes: a paired gain larger than its 95% CI."
    # Settings are chosen so that the gain is several times its CI; the margin (gain / CI) of every call is appended
    # to the file `FSMTL_MARGINS` names, so a run under other threads and seeds can be read off.
    gain, ci = paired_gain(better, worse)
    margin = gain / ci if ci > 0 else float('inf')
    if os.environ.get('FSMTL_MARGINS'):
        with open(os.environ['FSMTL_MARGINS'], 'a') as f:
            f.write(json.dumps(dict(test=name, gain=gain, ci95=ci, margin=margin, seed=TEST_SEED,
                                    threads=torch.get_num_threads())) + '\n')
    assert margin > 1, f"{name}: paired gain {100 * gain:.2f} ± {100 * ci:.2f} points, margin {margin:.2f} (needs > 1)"
    return margin
