"""Training images per second: fsmtl's task loader against the original pipeline, on the same in-memory data.

The original: a learn2learn TaskDataset (FusedNWaysKShots, LoadData, RemapLabels, ConsecutiveLabels) whose
dataset applies torchvision's Lee19 transforms to one PIL image at a time. fsmtl: `mtl_dls`, which loads each
task with one array gather and augments the whole batch at once. Both draw 5-way tasks of 5 shots + 5 queries,
6 tasks a batch, on the CPU, in this process; each is timed in three interleaved rounds and its best round counts,
as `timeit` advises. Run: `python bench/loader.py [--batches N] [--rounds N]`.
"""
import argparse
import time

import learn2learn as l2l
import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from fsmtl.data.block import mtl_dls
from fsmtl.data.core import FewShotSplits, Split

WAYS, PER_CLASS, TASKS = 5, 10, 6
STATS = {32: ([0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]),
         84: ([120.39586422 / 255, 115.59361427 / 255, 104.54012653 / 255], [70.68188272 / 255, 68.27635443 / 255, 72.54505529 / 255])}


class PILDataset(torch.utils.data.Dataset):
    "The original's dataset: one uint8 array per image, through PIL and torchvision's transforms."
    def __init__(self, images, labels, tfm): self.images, self.labels, self.tfm = images, labels, tfm
    def __len__(self): return len(self.labels)
    def __getitem__(self, i): return self.tfm(Image.fromarray(self.images[i])), int(self.labels[i])


def original(images, labels, size, pad):
    mean, std = STATS[size]
    tfm = T.Compose([T.RandomCrop(size, padding=pad), T.ColorJitter(0.4, 0.4, 0.4), T.RandomHorizontalFlip(),
                     T.ToTensor(), T.Normalize(mean, std)])
    ds = l2l.data.MetaDataset(PILDataset(images, labels, tfm))
    tt = l2l.data.transforms
    taskset = l2l.data.Taskset(ds, task_transforms=[tt.FusedNWaysKShots(ds, n=WAYS, k=PER_CLASS), tt.LoadData(ds),
                                                    tt.RemapLabels(ds), tt.ConsecutiveLabels(ds)])
    def batches():
        while True: yield [taskset.sample() for _ in range(TASKS)]
    return batches()


def ours(images, labels, size):
    classes = [f"c{i}" for i in range(labels.max() + 1)]
    novel = lambda names: Split(images[:100], np.repeat(np.arange(5), 20), names)  # unused here, but mtl_dls wants them
    splits = FewShotSplits('bench', Split(images, labels, classes), novel(list('abcde')), novel(list('fghij')), *STATS[size])
    dls = mtl_dls(splits, train_ways=WAYS, train_shots=5, train_queries=5, meta_batch_size=TASKS, epoch_length=10 ** 6,
                  val_episodes=1, test_episodes=1, device='cpu')
    return iter(dls.train)


def rate(batches, n):
    next(batches)  # warm up
    t = time.perf_counter()
    for _ in range(n): next(batches)
    return n * TASKS * WAYS * PER_CLASS / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--batches', type=int, default=30, help='timed batches of each loader and size in a round')
    p.add_argument('--rounds', type=int, default=3, help='rounds; the best of each loader counts')
    args = p.parse_args()
    torch.set_num_threads(2)
    ratios = []
    for size, n_classes, per_class in [(32, 64, 600), (84, 64, 100)]:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (n_classes * per_class, size, size, 3), dtype=np.uint8)
        labels = np.repeat(np.arange(n_classes), per_class)
        loaders = original(images, labels, size, 4 if size == 32 else 8), ours(images, labels, size)
        theirs, mine = (max(r) for r in zip(*[[rate(l, args.batches) for l in loaders] for _ in range(args.rounds)]))
        ratios.append(mine / theirs)
        print(f"{size}px: original {theirs:8.0f} img/s   fsmtl {mine:8.0f} img/s   ratio {mine / theirs:.1f}")
    print(f"ratio: {min(ratios):.1f}")


if __name__ == '__main__':
    main()
