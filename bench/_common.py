"What the bench scripts share: a device sync for honest timings, and random benchmarks of any size."
import sys

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


def bench_device(args,          # parsed options with `device` and the options of `gpu` and `cpu`
                 measures: str,  # what the script measures, for the message when there is no GPU
                 gpu: dict,      # option defaults on a GPU
                 cpu: dict):     # option defaults of the CPU smoke run
    "The device of a GPU bench (CUDA unless `--device cpu` asks for a smoke run), its unset options filled in."
    if args.device is None:
        if not torch.cuda.is_available():
            sys.exit(f"{sys.argv[0]} {measures} on a CUDA GPU and torch sees none here (torch {torch.__version__}, CUDA "
                     f"build {torch.version.cuda}). Run it on a GPU machine, or pass --device cpu for a short smoke run "
                     "that checks the script.")
        args.device = 'cuda'
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available(): sys.exit(f"--device {args.device}: torch sees no CUDA GPU here")
    for k, v in (gpu if device.type == 'cuda' else cpu).items():
        if getattr(args, k) is None: setattr(args, k, v)
    return device
