"What the bench scripts share: a device sync for honest timings, and random benchmarks of any size."
import numpy as np
import torch

from fsmtl.data.core import FewShotSplits, Split


def sync(device):
    "Wait for `device`'s queued work (CUDA runs asynchronously), so a timer reads the work done."
    if torch.device(device).type == 'cuda': torch.cuda.synchronize(device)


def synthetic_splits(size, n_base, per_class, seed=0, novel_per_class=20):
    "Random uint8 images: `n_base` base classes of `per_class` images, 5 validation and 5 test classes of `novel_per_class`."
    rng = np.random.default_rng(seed)
    def split(n, k, tag):
        labels = np.repeat(np.arange(n), k)
        return Split(rng.integers(0, 256, (len(labels), size, size, 3), dtype=np.uint8), labels, [f"{tag}{c}" for c in range(n)])
    return FewShotSplits('synthetic', split(n_base, per_class, 'b'), split(5, novel_per_class, 'v'),
                         split(5, novel_per_class, 't'), mean=(0.5,) * 3, std=(0.25,) * 3)
