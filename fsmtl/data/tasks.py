"Training tasks (`TaskDL`) and fixed episodes (`EpisodeDL`), drawn by learn2learn."
from __future__ import annotations
import random
from contextlib import contextmanager

import numpy as np
import torch
import learn2learn as l2l
from fastai.data.core import TfmdDL
from fastai.torch_core import TensorCategory
from fastai.vision.core import TensorImage, show_image
from fastai.vision.data import get_grid
from fastcore.meta import delegates

from .core import Split

__all__ = ['TaskDL', 'EpisodeDL', 'check_task_size', 'shot_counts', 'by_class', 'position_labels', 'support_query',
           'local_labels', 'seeded_random']


@contextmanager
def seeded_random(seed):  # the seed of Python's `random` inside the block; None: leave it as it is
    "Seed Python's `random` inside the block; restore it after."
    # learn2learn samples with Python's `random`
    state = random.getstate()
    if seed is not None: random.seed(seed)
    try: yield
    finally: random.setstate(state)


def check_task_size(split: Split,      # the classes to draw from
                    ways: int,         # classes in a task
                    per_class: int,    # images per class in a task
                    what: str,         # the split's name in the message: 'train', 'val', 'test'
                    name: str = ''):   # the benchmark's name in the message
    "Fail early, with the fix, if `split` is too small for the tasks."
    where = f"the {what} split{f' of {name}' if name else ''}"
    if ways < 2: raise ValueError(f"ways must be at least 2, got {ways}")
    if ways > split.n_classes:
        raise ValueError(f"{ways}-way tasks need {ways} classes but {where} has {split.n_classes}: lower the ways")
    counts = split.counts()
    small = [(split.classes[c], int(counts[c])) for c in np.flatnonzero(counts < per_class)]
    if small:
        listed = ', '.join(f"{c!r} ({n})" for c, n in small[:5]) + (f" and {len(small) - 5} more" if len(small) > 5 else '')
        raise ValueError(f"tasks need {per_class} images a class (shots + queries) but in {where} "
                         f"{len(small)} classes have fewer: {listed}. Lower shots or queries, or drop those classes")


def shot_counts(shots  # a shot count, or several like (1, 5)
                ) -> list:
    "The shot counts of `shots`, ascending and distinct; each must be at least 1."
    counts = sorted({shots} if isinstance(shots, int) else {int(s) for s in shots})
    if not counts or counts[0] < 1: raise ValueError(f"shot counts must be at least 1, got {shots}")
    return counts


def by_class(x,               # items of whole tasks or episodes (T*ways*per_class, ...), task-major and class-major
             ways: int,       # classes in a task
             per_class: int): # items of a class in a task
    "`x` as (T, ways, per_class, ...): task, class, position in the class."
    return x.view(-1, ways, per_class, *x.shape[1:])


def position_labels(tasks: int,       # tasks
                    ways: int,        # classes in a task
                    per_class: int,   # items per class in a task
                    device=None):     # where the labels go
    "Labels 0..ways-1 (tasks, ways*per_class) of class-major tasks."
    return torch.arange(ways, device=device).repeat_interleave(per_class).expand(tasks, -1)


def support_query(x,               # items of whole tasks or episodes (T*ways*per_class, ...), class-major
                  ways: int,       # classes in a task
                  per_class: int,  # items of a class in a task
                  shots: int,      # the first `shots` of each class are the support
                  queries: int):   # the last `queries` of each class are the query
    "Each task's support (T, ways*shots, ...) and query (T, ways*queries, ...), by position."
    z = by_class(x, ways, per_class)
    return z[:, :, :shots].flatten(1, 2), z[:, :, per_class - queries:].flatten(1, 2)


def local_labels(y,                  # global class ids of a batch of tasks, task-major and class-major
                 ways: int,          # classes in a task
                 per_class: int):    # images per class in a task
    "Labels 0..ways-1 within each task, in the order of its classes."
    # a new tensor: `y` is left as it is
    classes = by_class(y, ways, per_class)[:, :, 0]
    y = y.view(-1, ways * per_class)
    # comparing against all of a task's classes at once cannot merge two classes, as relabelling in place can
    return (y.unsqueeze(-1) == classes.unsqueeze(1)).int().argmax(-1).flatten()


class _Labels(torch.utils.data.Dataset):
    "The labels of a split as the torch Dataset learn2learn's `MetaDataset` wants."
    # tasks are drawn from the labels alone
    def __init__(self, labels): self.labels = labels
    def __len__(self): return len(self.labels)
    def __getitem__(self, i): return i, int(self.labels[i])


def _sampler(split: Split, ways: int, per_class: int):
    "A learn2learn `Taskset` drawing `ways` classes x `per_class` images, class-major."
    items = {c: np.flatnonzero(split.labels == c).tolist() for c in range(split.n_classes)}
    meta = l2l.data.MetaDataset(_Labels(split.labels), labels_to_indices=items)
    return l2l.data.Taskset(meta, task_transforms=[l2l.data.transforms.FusedNWaysKShots(meta, n=ways, k=per_class)])


def _sample_task(taskset) -> np.ndarray:
    "Indices of one freshly drawn task."
    return np.fromiter((d.index for d in taskset.sample_task_description()), dtype=np.int64)


class _SplitDL(TfmdDL):
    "Loads whole tasks from a `Split` in one vectorised call; a batch concatenates `bs` tasks."
    def __init__(self, dataset=None, split: Split = None, ways=5, per_class=10, label_offset=0, vocab=None, **kwargs):
        self.split, self.ways, self.per_class, self.label_offset, self.vocab = split, ways, per_class, label_offset, vocab
        super().__init__(dataset, **kwargs)

    def load_task(self, idxs):  # item indices of one task, class-major
        "Images (uint8, channels first) and global class ids of the split's items `idxs`."
        x = torch.from_numpy(self.split.load(idxs)).permute(0, 3, 1, 2).contiguous()
        y = torch.from_numpy(self.split.labels[idxs] + self.label_offset)
        return TensorImage(x), TensorCategory(y)

    def create_batch(self, b):
        xs, ys = zip(*b)
        return TensorImage(torch.cat(xs)), TensorCategory(torch.cat(ys))

    def new(self, dataset=None, cls=None, **kwargs):
        keep = dict(split=self.split, ways=self.ways, per_class=self.per_class, label_offset=self.label_offset, vocab=self.vocab)
        return super().new(dataset, cls, **{**keep, **kwargs})

    def show_batch(self,
                   b=None,              # a batch (x, y); None: a new one
                   max_n: int = 4,      # tasks (rows) at most
                   per_class: int = 1,  # images of each class
                   figsize=None,        # matplotlib figure size; None: from the grid
                   **kwargs):           # passed to fastai's `show_image`
        "Draw up to `max_n` tasks as rows, `per_class` images of each class, titled with the class names."
        x, y = self.decode(self.one_batch() if b is None else b)
        x = x.clamp(0, 255).to(torch.uint8)  # decoding gives 0..255 as int64
        y = by_class(y, self.ways, self.per_class)[:max_n, :, :per_class].flatten()
        x = by_class(x, self.ways, self.per_class)[:max_n, :, :per_class].flatten(0, 2)
        n_rows, n_cols = len(x) // (self.ways * per_class), self.ways * per_class
        axs = get_grid(n_rows * n_cols, nrows=n_rows, ncols=n_cols, figsize=figsize or (1.6 * n_cols, 1.8 * n_rows))
        for ax, im, c in zip(axs, x, y):
            show_image(im.permute(1, 2, 0).numpy(), ax=ax, title=str(self.vocab[int(c)]) if self.vocab is not None else str(int(c)), **kwargs)


@delegates(TfmdDL, but=['shuffle', 'drop_last'])
class TaskDL(_SplitDL):
    "Training batches of `bs` fresh tasks, task-major and class-major."
    def __init__(self, dataset=None,   # fastai's dataset argument; items come from `split`
                 split: Split = None,    # the base classes
                 ways: int = 5,          # classes in a task
                 per_class: int = 10,    # images per class in a task: shots + queries
                 n: int = 1600,          # tasks in an epoch
                 bs: int = 6,            # tasks in a batch (meta_batch_size)
                 pooled: bool = False,   # draw each task's `ways * per_class` images from all base classes at random
                 **kwargs):              # passed to fastai's `TfmdDL` (device, after_batch ...)
        kwargs.pop('shuffle', None)
        super().__init__(dataset, split=split, ways=ways, per_class=per_class, n=n, bs=bs,
                         drop_last=kwargs.pop('drop_last', True), **kwargs)
        self.taskset, self.pooled = _sampler(split, ways, per_class), pooled

    def create_item(self, s):
        # pooled: the batches of pretraining, images at random as RFS and Baseline++ draw them. One softmax over all base
        # classes does not learn from batches of a few classes with many images each (README, the MTL study)
        if self.pooled: return self.load_task(np.array(random.sample(range(len(self.split)), self.ways * self.per_class)))
        return self.load_task(_sample_task(self.taskset))

    def new(self, dataset=None, cls=None, **kwargs):
        return super().new(dataset, cls, **{'pooled': self.pooled, **kwargs})


@delegates(TfmdDL, but=['shuffle', 'drop_last'])
class EpisodeDL(_SplitDL):
    "Fixed episodes of `ways` classes x (`shots` + `queries`) images, the same for one seed."
    def __init__(self, dataset=None,  # fastai's dataset argument; items come from `split`
                 split: Split = None,   # the novel classes
                 ways: int = 5,         # classes per episode
                 shots: int = 5,        # support images per class (the largest shot count to score)
                 queries: int = 15,     # query images per class
                 n: int = 400,          # episodes
                 seed: int = 0,         # fixes the episodes
                 chunk: int = 256,      # images per batch at most (whole episodes, one at least)
                 bs: int | None = None,  # episodes per batch; None: as many as `chunk` images hold
                 episodes=None,         # (n, ways * (shots + queries)) item indices; None: drawn from `seed`
                 **kwargs):             # passed to fastai's `TfmdDL` (device, after_batch ...)
        for k in ('shuffle', 'drop_last', 'per_class'): kwargs.pop(k, None)
        for what, v in dict(shots=shots, queries=queries, episodes=n).items():
            if v < 1: raise ValueError(f"{what} must be at least 1, got {v}")
        if episodes is None:
            taskset = _sampler(split, ways, shots + queries)
            with seeded_random(seed): episodes = np.stack([_sample_task(taskset) for _ in range(n)])
        self.episodes, self.shots, self.queries, self.seed, self.chunk = episodes, shots, queries, seed, chunk
        if bs is None: bs = max(1, chunk // (ways * (shots + queries)))
        super().__init__(dataset, split=split, ways=ways, per_class=shots + queries, n=len(episodes), bs=bs, **kwargs)

    def create_item(self, s): return self.load_task(self.episodes[s or 0])

    def new(self, dataset=None, cls=None, **kwargs):
        keep = dict(shots=self.shots, queries=self.queries, seed=self.seed, chunk=self.chunk, episodes=self.episodes)
        return super().new(dataset, cls, **{**keep, **kwargs})
