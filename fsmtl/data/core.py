"Few-shot splits: per split, the images, their integer labels and the class names."
from __future__ import annotations
import dataclasses
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .images import decode_image

__all__ = ['InputSpec', 'Split', 'FewShotSplits', 'SPLITS']

SPLITS = ('train', 'val', 'test')


@dataclass(frozen=True)
class InputSpec:
    "A model's input: images loaded at `image_size`, resized to `size`, normalised."
    # resized per batch on the device, normalised by `mean` and `std`
    size: int                          # side of the square images the model takes
    mean: tuple = (0.5, 0.5, 0.5)      # per-channel mean of images in 0..1
    std: tuple = (0.25, 0.25, 0.25)    # per-channel std of images in 0..1
    image_size: int | None = None      # side the images are loaded (stored) at, before that resize; None: `size`
    interpolation: str = 'bilinear'    # the resize's filter: 'bilinear', 'bicubic' or 'nearest'

    def __post_init__(self):
        fix = dict(size=int(self.size), image_size=int(self.image_size or self.size),
                   mean=tuple(float(m) for m in self.mean), std=tuple(float(s) for s in self.std))
        for k, v in fix.items(): object.__setattr__(self, k, v)

    @property
    def resized(self) -> bool:
        "Whether batches are resized from `image_size` to `size`."
        return self.image_size != self.size

    def state(self) -> dict:
        "Its fields as a checkpoint stores them."
        return dict(size=self.size, mean=list(self.mean), std=list(self.std), image_size=self.image_size,
                    interpolation=self.interpolation)

    @classmethod
    def from_state(cls, st: dict):  # a checkpoint, or what `state` gave
        "The input a checkpoint records."
        # checkpoints from before `image_size` and `interpolation` were recorded load images straight at `size`
        return cls(st['size'], st['mean'], st['std'], st.get('image_size'), st.get('interpolation', 'bilinear'))


@dataclass
class Split:
    "The images, labels and class names of one split."
    items: object                  # uint8 array (N, H, W, 3), or a sequence of PNG/JPEG bytes, file paths or PIL images
    labels: np.ndarray             # int64 (N,) in 0..C-1, index into `classes`
    classes: list                  # class names, one per label value
    size: int | None = None        # side of the square images `load` returns; None keeps the stored size

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.classes = [str(c) for c in self.classes]
        if len(self.labels) != len(self.items):
            raise ValueError(f"{len(self.items)} items but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"labels must lie in 0..{len(self.classes) - 1}")
        if len(set(self.classes)) != len(self.classes): raise ValueError("class names must be unique within a split")

    def __len__(self): return len(self.labels)

    @property
    def n_classes(self): return len(self.classes)

    @property
    def in_memory(self): return isinstance(self.items, np.ndarray)

    def counts(self):
        "Number of images of each class."
        return np.bincount(self.labels, minlength=self.n_classes)

    def load(self, idxs  # item indices into the split
             ) -> np.ndarray:
        "Images `idxs` as one uint8 array (n, H, W, 3)."
        idxs = np.asarray(idxs, dtype=np.int64)
        if self.in_memory:
            ims = self.items[idxs]
            if self.size is None or ims.shape[1:3] == (self.size, self.size): return ims
            return np.stack([np.asarray(Image.fromarray(im).resize((self.size, self.size), Image.BILINEAR)) for im in ims])
        ims = [decode_image(self.items[i], self.size) for i in idxs]
        if len({im.shape for im in ims}) > 1:
            raise ValueError("Images of different sizes in one batch: pass `size` to resize them to one square side")
        return np.stack(ims) if ims else np.zeros((0, self.size or 0, self.size or 0, 3), np.uint8)

    def image_size(self) -> int:
        "Side of the images `load` returns."
        if self.size is not None: return self.size
        if self.in_memory: return self.items.shape[1]
        return self.load([0]).shape[1]


@dataclass
class FewShotSplits:
    "Base (train) and novel (val, test) classes of a benchmark."
    name: str                                  # benchmark name
    train: Split                               # base classes
    val: Split                                 # novel classes for validation
    test: Split                                # novel classes for the final test
    mean: tuple = (0.5, 0.5, 0.5)              # per-channel mean of images in 0..1, for normalisation
    std: tuple = (0.25, 0.25, 0.25)            # per-channel std of images in 0..1
    meta: dict = field(default_factory=dict)   # anything else worth keeping (source, superclasses, scripts)
    input_size: int | None = None              # side the model takes, resized per batch on the device; None: as loaded
    interpolation: str = 'bilinear'            # the filter of that resize

    def __post_init__(self):
        # the class names of the three splits are disjoint
        seen = {}
        for s in SPLITS:
            for c in self[s].classes:
                if c in seen: raise ValueError(f"class {c!r} is in both the {seen[c]} and the {s} split of {self.name}")
                seen[c] = s

    def __getitem__(self, split) -> Split:
        if split == 'valid': split = 'val'
        if split not in SPLITS: raise KeyError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        return getattr(self, split)

    @property
    def size(self):
        "Side the model sees: `input_size` if set, else the loaded images'."
        return self.input_size or self.train.image_size()

    @property
    def input(self) -> InputSpec:
        "What a model trained on these splits takes."
        return InputSpec(self.size, self.mean, self.std, self.train.image_size(), self.interpolation)

    def with_input(self, spec: InputSpec  # the input to serve
                   ) -> FewShotSplits:
        "These splits served as `spec`: loaded at its `image_size`, resized to its `size`, normalised."
        # the images load at `image_size` through their `Split`s; a new `FewShotSplits` holds the rest, so that other
        # DataLoaders built on this one keep their input
        for s in SPLITS: self[s].size = spec.image_size
        return dataclasses.replace(self, mean=spec.mean, std=spec.std, input_size=spec.size if spec.resized else None,
                                   interpolation=spec.interpolation)

    def __repr__(self):
        parts = ', '.join(f"{s}: {self[s].n_classes} classes / {len(self[s])} images" for s in SPLITS)
        return f"FewShotSplits({self.name!r}, {parts}, {self.size}px)"
