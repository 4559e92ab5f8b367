"`mtl_dls`: the fastai DataBlock and DataLoaders of a benchmark."
from __future__ import annotations

from pathlib import Path

import numpy as np
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.core import DataLoaders
from fastai.torch_core import default_device
from fastai.vision.data import ImageBlock

from .benchmarks import get_benchmark
from .core import SPLITS, FewShotSplits
from .tasks import EpisodeDL, TaskDL, check_task_size, seeded_random, shot_counts
from .transforms import lee19_tfms

__all__ = ['FINAL_SHOTS', 'mtl_block', 'mtl_dls', 'episode_dl']

FINAL_SHOTS = (1, 5)   # the shot counts of the final test, scored on the same test episodes


class _Pool:
    "The items of all three splits under one global index, as the DataBlock sees them."
    # class ids run train, val, test
    def __init__(self, splits: FewShotSplits):
        self.splits = splits
        self.starts = np.cumsum([0] + [len(splits[s]) for s in SPLITS])
        self.class_offsets = dict(zip(SPLITS, np.cumsum([0] + [splits[s].n_classes for s in SPLITS])))
        self.vocab = [c for s in SPLITS for c in splits[s].classes]

    def _locate(self, i):
        k = int(np.searchsorted(self.starts, i, side='right')) - 1
        return SPLITS[k], int(i - self.starts[k])

    def image(self, i):
        s, j = self._locate(i)
        return self.splits[s].load([j])[0]

    def label(self, i):
        s, j = self._locate(i)
        return self.vocab[self.class_offsets[s] + int(self.splits[s].labels[j])]

    def split_items(self, items):
        parts = [list(range(self.starts[k], self.starts[k + 1])) for k in range(len(SPLITS))]
        # fastai sets its transforms up on the first training item: with every class in test (a cross-domain test)
        # that is a test image, in a training subset no loader reads
        if not parts[0]: parts[0] = [next(i for p in parts for i in p)]
        return parts


def mtl_block(splits: FewShotSplits,   # the benchmark
              augment: bool = True):   # Lee19 augmentation on training batches
    "A DataBlock of all three splits' images and class names."
    # with Lee19's batch transforms
    pool = _Pool(splits)
    tfms = lee19_tfms(splits.input, augment)  # its IntToFloatTensor merges with ImageBlock's
    # DataBlock binds the functions it is given to itself: hand it plain functions, not the pool's methods
    return DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=pool.vocab, sort=False)),
                     get_items=lambda _: list(range(pool.starts[-1])), splitter=lambda o: pool.split_items(o),
                     get_x=lambda i: pool.image(i), get_y=lambda i: pool.label(i), batch_tfms=tfms), pool


def mtl_dls(name_or_splits='glyphs',      # a benchmark name for `get_benchmark`, or `FewShotSplits`
            root: str = '~/data',         # where benchmarks live (the images' folder for 'folder')
            train_ways: int = 5,          # classes in a training task
            train_shots: int = 5,         # support images a class in a training task
            train_queries: int = 5,       # query images a class in a training task (MTL uses shots + queries alike)
            meta_batch_size: int = 6,     # tasks in a training batch
            epoch_length: int = 1600,     # training tasks in an epoch
            test_ways: int = 5,           # classes in an evaluation episode
            test_shots=5,                 # support images per class in validation; a tuple like (1, 5) scores each
            final_shots=FINAL_SHOTS,      # the final test's shot counts: the test episodes hold these and `test_shots`
            test_queries: int = 15,       # query images per class in an episode
            val_episodes: int = 400,      # fixed validation episodes
            test_episodes: int = 2000,    # fixed test episodes
            size: int | None = None,      # resize images to this square side; None keeps the benchmark's
            chunk: int = 256,             # images per evaluation batch at most (whole episodes, one at least)
            seed: int = 0,                # fixes the validation and test episodes
            augment: bool = True,         # Lee19 augmentation on training batches
            num_workers: int | None = None,  # loader processes; None: 0 for in-memory data, else all cores
            device=None,                  # where batches go and are augmented; None: fastai's default (GPU when there is one)
            download: bool = True,        # fetch missing benchmark files
            **kwargs                      # passed to `get_benchmark`
            ) -> DataLoaders:             # train (tasks), valid and test (episodes)
    "DataLoaders of a benchmark: training tasks, validation episodes and test episodes (`dls[2]`)."
    splits = name_or_splits if isinstance(name_or_splits, FewShotSplits) else \
        get_benchmark(name_or_splits, root=root, download=download, **kwargs)
    if size is not None:
        for s in SPLITS: splits[s].size = size
    val = shot_counts(test_shots)
    final = shot_counts({*shot_counts(final_shots), *val})
    shots = dict(val=val[-1], test=final[-1])
    check_task_size(splits.train, train_ways, train_shots + train_queries, 'train', splits.name)
    for s in ('val', 'test'): check_task_size(splits[s], test_ways, shots[s] + test_queries, s, splits.name)
    if meta_batch_size < 1 or epoch_length < meta_batch_size:
        raise ValueError(f"epoch_length ({epoch_length}) must hold at least one batch of meta_batch_size ({meta_batch_size}) tasks")
    block, pool = mtl_block(splits, augment=augment)
    if device is None: device = default_device()
    dsets = block.datasets(splits)
    if num_workers is None: num_workers = 0 if splits.train.in_memory else None
    common = dict(after_batch=block.batch_tfms, vocab=pool.vocab, num_workers=num_workers, device=device)
    train = TaskDL(dsets.subset(0), split=splits.train, ways=train_ways, per_class=train_shots + train_queries,
                   n=epoch_length, bs=meta_batch_size, **common)
    evals = [_episode_dl(dsets, pool, s, ways=test_ways, shots=shots[s], queries=test_queries, n=n, seed=seed, chunk=chunk,
                         **common) for s, n in [('val', val_episodes), ('test', test_episodes)]]
    dls = DataLoaders(train, *evals, path=Path(root).expanduser(), device=device)
    dls.splits, dls.test_shots, dls.final_shots, dls.train_shots = splits, test_shots, tuple(final), train_shots
    return dls


def _episode_dl(dsets, pool, split, **kwargs):
    "The `EpisodeDL` of `split` over the DataBlock's datasets of all three splits; `kwargs` go to `EpisodeDL`."
    k = SPLITS.index(split)
    return EpisodeDL(dsets.subset(k), split=pool.splits[split], label_offset=int(pool.class_offsets[split]), **kwargs)


def episode_dl(splits: FewShotSplits,      # the benchmark
               split: str = 'test',        # 'val' or 'test' (or 'train', to probe base classes)
               ways: int = 5,              # classes per episode
               shots: int = 5,             # support images per class
               queries: int = 15,          # query images per class
               n: int = 2000,              # episodes
               bs: int | None = None,      # episodes per batch; None: as many as `chunk` images hold
               seed: int = 0,              # fixes the episodes: the same as `mtl_dls` draws for the same arguments
               device=None,                # where batches go; None: fastai's default
               num_workers: int | None = None,  # loader processes; None: 0 for in-memory data, else all cores
               chunk: int = 256):          # images per batch at most, when `bs` is None
    "Fixed, seeded episodes of one split, normalised as `mtl_dls`'s evaluation batches are."
    split = 'val' if split == 'valid' else split
    if split not in SPLITS: raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if min(shots, queries, n) >= 1: check_task_size(splits[split], ways, shots + queries, split, splits.name)
    block, pool = mtl_block(splits, augment=False)
    if num_workers is None: num_workers = 0 if splits[split].in_memory else None
    device = default_device() if device is None else device
    # fastai seeds each new loader from Python's `random`: building episodes, at whatever epoch, must not move the
    # training tasks' random stream, or a resumed run would draw other tasks than the uninterrupted one
    with seeded_random(None):
        return _episode_dl(block.datasets(splits), pool, split, ways=ways, shots=shots, queries=queries, n=n, seed=seed,
                           chunk=chunk, bs=bs, after_batch=block.batch_tfms, vocab=pool.vocab, num_workers=num_workers,
                           device=device)
