"Synthetic benchmarks for tests: every image carries its split, class and index in its first pixels."
import numpy as np
import timm
import torch
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
