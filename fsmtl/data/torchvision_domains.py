"torchvision's classification datasets as few-shot benchmarks, read lazily through the dataset."
from __future__ import annotations
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastai.vision.core import imagenet_stats

from .core import FewShotSplits, Split
from .download import DataUnavailable

__all__ = ['TorchvisionSpec', 'TORCHVISION_DATASETS', 'DatasetItems', 'torchvision_benchmark', 'empty_split']


@dataclass
class TorchvisionSpec:
    "How fsmtl reads one torchvision dataset class."
    parts: list                         # constructor arguments of each part pooled (its train, val, test ...)
    expects: str                        # where under `root` torchvision reads the files, for the offline message
    size: int = 84                      # side the images are resized to when loaded
    fixed: dict = field(default_factory=dict)  # part index -> 'train' or 'test' for datasets split by their authors


def _mnist(folder, **kw):
    return TorchvisionSpec([dict(train=True, **kw), dict(train=False, **kw)],
                           f'{folder}/raw/ (the idx files, e.g. train-images-idx3-ubyte)', 28)


def _parts(key, *values): return [{key: v} for v in values]


TORCHVISION_DATASETS = {
    'EuroSAT': TorchvisionSpec([{}], 'eurosat/2750/<class>/*.jpg', 64),
    'Flowers102': TorchvisionSpec(_parts('split', 'train', 'val', 'test'),
                                  'flowers-102/ (jpg/image_*.jpg, imagelabels.mat, setid.mat)'),
    'DTD': TorchvisionSpec(_parts('split', 'train', 'val', 'test'), 'dtd/dtd/ (images/<class>/*.jpg, labels/*.txt)'),
    'GTSRB': TorchvisionSpec(_parts('split', 'train', 'test'),
                             'gtsrb/GTSRB/Training/<class>/*.ppm, gtsrb/GTSRB/Final_Test/Images and gtsrb/GT-final_test.csv', 32),
    'FGVCAircraft': TorchvisionSpec(_parts('split', 'trainval', 'test'),
                                    'fgvc-aircraft-2013b/data/ (images/*.jpg, variants.txt, images_variant_*.txt)'),
    'OxfordIIITPet': TorchvisionSpec(_parts('split', 'trainval', 'test'),
                                     'oxford-iiit-pet/ (images/*.jpg, annotations/trainval.txt, annotations/test.txt)'),
    'Food101': TorchvisionSpec(_parts('split', 'train', 'test'), 'food-101/ (images/<class>/*.jpg, meta/*.json)'),
    'CIFAR10': TorchvisionSpec(_parts('train', True, False), 'cifar-10-batches-py/', 32),
    'CIFAR100': TorchvisionSpec(_parts('train', True, False), 'cifar-100-python/', 32),
    'SVHN': TorchvisionSpec(_parts('split', 'train', 'test'), 'train_32x32.mat, test_32x32.mat', 32),
    'STL10': TorchvisionSpec(_parts('split', 'train', 'test'), 'stl10_binary/', 96),
    'USPS': TorchvisionSpec(_parts('train', True, False), 'usps.bz2, usps.t.bz2', 16),
    'MNIST': _mnist('MNIST'),
    'FashionMNIST': _mnist('FashionMNIST'),
    'KMNIST': _mnist('KMNIST'),
    'EMNIST': _mnist('EMNIST', split='balanced'),
    # Lake et al. (2015): the 30 background alphabets to learn from, the 20 evaluation alphabets to test on
    'Omniglot': TorchvisionSpec(_parts('background', True, False),
                                'omniglot-py/ (images_background/<alphabet>/<character>/*.png and images_background.zip, '
                                'the same for images_evaluation)', 28, fixed={0: 'train', 1: 'test'}),
}

# what the torchvision datasets that are not image classification label their images with
_NOT_CLASSIFICATION = {
    **dict.fromkeys(['VOCDetection', 'CocoDetection', 'Kitti', 'WIDERFace'], 'an object detection dataset'),
    **dict.fromkeys(['VOCSegmentation', 'Cityscapes', 'SBDataset'], 'a segmentation dataset'),
    **dict.fromkeys(['CocoCaptions', 'Flickr8k', 'Flickr30k', 'SBU'], 'a captioning dataset'),
    **dict.fromkeys(['Kinetics', 'HMDB51', 'UCF101', 'MovingMNIST'], 'a video dataset'),
    **dict.fromkeys(['FlyingChairs', 'FlyingThings3D', 'Sintel', 'KittiFlow', 'HD1K'], 'an optical flow dataset'),
    **dict.fromkeys(['CarlaStereo', 'Kitti2012Stereo', 'Kitti2015Stereo', 'CREStereo', 'FallingThingsStereo',
                     'SceneFlowStereo', 'SintelStereo', 'InStereo2k', 'ETH3DStereo', 'Middlebury2014Stereo'],
                    'a stereo matching dataset'),
    **dict.fromkeys(['CelebA', 'LFWPairs', 'PhotoTour'], 'a dataset of attributes or image pairs'),
}


class DatasetItems(Sequence):
    "Images of torchvision datasets by (part, index), loaded through the dataset when asked for."
    def __init__(self, datasets,  # the torchvision datasets pooled, each built without a transform
                 index):          # (N, 2) int: the dataset and the index within it of each item
        self.datasets, self.index = datasets, np.asarray(index, dtype=np.int64).reshape(-1, 2)

    def __len__(self): return len(self.index)

    def __getitem__(self, i):
        part, j = self.index[i]
        return self.datasets[part][int(j)][0]


def _labels(ds) -> np.ndarray:
    "The class index of each image of `ds`, read without loading an image."
    for attr in ('targets', '_labels', 'labels', 'y'):
        if (v := getattr(ds, attr, None)) is not None: return np.asarray(v, dtype=np.int64).reshape(-1)
    for attr in ('_samples', 'samples', '_flat_character_images'):
        if (v := getattr(ds, attr, None)) is not None: return np.asarray([int(s[1]) for s in v], dtype=np.int64)
    raise TypeError(f"{type(ds).__name__} holds its labels in no attribute fsmtl knows")


def _class_names(ds, labels) -> dict:
    "Class index -> name, from the dataset's `classes` (Omniglot: its characters) else the index."
    names = getattr(ds, 'classes', None) or getattr(ds, '_characters', None)
    return {int(c): str(names[c]) if names is not None and c < len(names) else f'class {c}' for c in np.unique(labels)}


def _spec(name):
    "The name as torchvision spells it and its `TorchvisionSpec`."
    import torchvision.datasets as tvd
    known = {k.lower(): k for k in TORCHVISION_DATASETS}
    if (k := known.get(name.lower())) is not None: return k, TORCHVISION_DATASETS[k]
    other = {k.lower(): k for k in getattr(tvd, '__all__', [])}.get(name.lower())
    supported = ', '.join(TORCHVISION_DATASETS)
    if other in _NOT_CLASSIFICATION:
        raise ValueError(f"torchvision:{other} is {_NOT_CLASSIFICATION[other]}: few-shot episodes need one class label "
                         f"per image. Use an image classification dataset: {supported}")
    what = f"torchvision's {other} is not read by fsmtl" if other else f"torchvision has no dataset {name!r}"
    raise ValueError(f"{what}: use one of {supported}, or a folder of class folders ('folder:/path')")


def _open(cls, name, spec, root, download, kwargs):
    "The dataset of one part, downloaded by torchvision only if its files are missing and `download` is set."
    try: return cls(root, **kwargs, download=False)
    except RuntimeError as e:
        if download: return cls(root, **kwargs, download=True)
        raise DataUnavailable(f"torchvision's {name} has no data in {root} ({e}). It reads {Path(root) / spec.expects}. "
                              f"Put the files there, or let torchvision download them: download=True from Python, "
                              f"--download with fsmtl test") from None


def empty_split(size  # side of its images
                ) -> Split:
    "A split without classes, of images of side `size`."
    return Split(np.zeros((0, size, size, 3), np.uint8), [], [], size=size)


def _split_of(names, ids, labels, datasets, index, size) -> Split:
    "The `Split` of the classes `names` out of the pooled items, whose class ids are `labels`."
    if not names: return empty_split(size)
    rows = [np.flatnonzero(labels == ids[n]) for n in names]
    return Split(DatasetItems(datasets, index[np.concatenate(rows)]), np.repeat(np.arange(len(names)), [len(r) for r in rows]),
                 names, size=size)


def _draw(classes, shares, seed) -> list:
    "`classes` drawn into len(`shares`) groups by their shares, reproducibly for `seed`."
    n, r = len(classes), np.asarray(shares, dtype=float) / sum(shares)
    counts = [round(n * x) for x in r[1:]]
    counts = [n - sum(counts), *counts]
    order = np.random.default_rng(seed).permutation(n)
    return [sorted(classes[i] for i in part) for part in np.split(order, np.cumsum(counts)[:-1])]


def torchvision_benchmark(
    name,                     # a class of `TORCHVISION_DATASETS`, in any case: 'EuroSAT', 'omniglot'
    root='~/data',            # the root folder given to the torchvision dataset
    download=False,           # let torchvision download missing files
    split='ratios',           # 'ratios': classes drawn by `ratios`; 'test_only': every class in the test split
    ratios=(0.6, 0.2, 0.2),   # shares of the classes for train, val and test (Omniglot: train and val of its background)
    seed=0,                   # seed of the draw of classes into splits
    size=None,                # side the images are resized to when loaded; None: the dataset's usual side
) -> FewShotSplits:
    "Few-shot splits of a torchvision classification dataset, its images read through it when loaded."
    import torchvision.datasets as tvd
    name, spec = _spec(name)
    if split not in ('ratios', 'test_only'): raise ValueError(f"split must be 'ratios' or 'test_only', not {split!r}")
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios[:2]) <= 0:
        raise ValueError(f"ratios must be three non-negative numbers for train, val and test, not {ratios}")
    root, size = Path(root).expanduser(), size or spec.size
    datasets = [_open(getattr(tvd, name), name, spec, root, download, kw) for kw in spec.parts]
    per_part = [_labels(ds) for ds in datasets]
    # classes are pooled by name over the parts (MNIST's train and test hold the same ten)
    names, owner = {}, {}
    for p, (ds, y) in enumerate(zip(datasets, per_part)):
        for c, n in _class_names(ds, y).items():
            names[(p, c)] = n
            owner.setdefault(n, spec.fixed.get(p))
    classes = sorted(owner)
    ids = {n: i for i, n in enumerate(classes)}
    index = np.concatenate([np.stack([np.full(len(y), p), np.arange(len(y))], 1) for p, y in enumerate(per_part)])
    labels = np.concatenate([[ids[names[(p, int(c))]] for c in y] for p, y in enumerate(per_part)]).astype(np.int64)
    if split == 'test_only': groups = [[], [], classes]
    elif spec.fixed:
        train, val = _draw([c for c in classes if owner[c] == 'train'], ratios[:2], seed)
        groups = [train, val, [c for c in classes if owner[c] == 'test']]
    else: groups = _draw(classes, ratios, seed)
    splits = [_split_of(g, ids, labels, datasets, index, size) for g in groups]
    return FewShotSplits(f'torchvision:{name}', *splits, mean=tuple(imagenet_stats[0]), std=tuple(imagenet_stats[1]),
                         meta={'source': str(root), 'split': split})
