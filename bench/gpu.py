"""Training images per second on a GPU: `mtl_learner(precision='bf16', channels_last=True)` against fp32, mini-ImageNet sized.

The setting: the full-width ResNet-12 (64, 160, 320, 640), 84-pixel images, 5-way tasks of 5 + 5 images, 6 tasks a
batch (300 images), drawn from 64 base classes of random uint8 images held in memory (`--per-class` each), Lee19
augmentation on the device: `mtl_dls` and `mtl_learner` as users train, with all their callbacks, but with fastai's
progress bar off and the epoch table not printed (`learn.no_bar()`, `learn.no_logging()`) to keep the output readable
(bench/train_step.py --progress measures the bar). Each precision has its own learner, built from the same seed. Each
round runs one `fit` of `--warmup` + `--steps` batches of each, fp32 first, and times the last `--steps` batches, from
the end of the warm-up to the end of training, between `torch.cuda.synchronize()` calls: sampling, loading and
augmenting those batches is inside the time, as in training; the validation episodes scored after each epoch (2 here)
are not. Each precision's best round counts. The loader alone is timed too, over as many batches, to show whether it
limits either rate.
This script needs fsmtl installed (`pip install -e .` of this repository, which brings fastai). Without CUDA it stops,
unless `--device cpu` is given: then it runs a smoke setting (3 steps of a small ResNet-12 on 32-pixel images) that
checks the script end to end; bf16 autocast then runs on the CPU (emulated where the CPU lacks bf16 instructions) and
the ratio means little.
Run: `python bench/gpu.py [--steps N] [--rounds N] [--device cuda|cpu] [--size PX] [--channels 64,160,320,640]`.
"""
import argparse
import time

import torch
from fastai.callback.core import Callback

from _common import bench_device, sync, synthetic_splits
from fsmtl.data.block import mtl_dls
from fsmtl.learner import mtl_learner

WAYS, SHOTS, QUERIES, N_BASE, SEED = 5, 5, 5, 64, 0
GPU_DEFAULTS = dict(steps=200, warmup=10, size=84, channels='64,160,320,640', rounds=2)
CPU_SMOKE = dict(steps=3, warmup=1, size=32, channels='8,16,16,32', rounds=1)


class StepTimer(Callback):
    "Time the training batches after the first `warmup`, from the end of the warm-up to the end of training, between syncs."
    order = 100   # after every other callback's `after_batch`

    def __init__(self, warmup): self.warmup, self.seconds, self.batches = warmup, None, 0

    def before_train(self): self.start = None

    def after_batch(self):
        if self.training and self.iter == self.warmup - 1:
            sync(self.dls.device)
            self.start = time.perf_counter()

    def after_train(self):
        sync(self.dls.device)
        if self.start is not None: self.seconds, self.batches = time.perf_counter() - self.start, self.n_iter - self.warmup


def learner(dls, channels, **kwargs):
    "An `mtl_learner` of a ResNet-12 of `channels`, its weights drawn from `SEED`, with a `StepTimer`."
    torch.manual_seed(SEED)
    return mtl_learner(dls, arch='resnet12', arch_kwargs=dict(channels=channels), cbs=[StepTimer(0)], **kwargs)


def timed_fit(learn, warmup):
    "Images a second of the timed batches of one `fit` of the learner's whole epoch."
    learn.step_timer.warmup = warmup
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    t = learn.step_timer
    return t.batches * learn.dls.train.bs * WAYS * (SHOTS + QUERIES) / t.seconds


def loader_rate(dl, warmup, steps, device):
    "Images a second of the training loader alone (sampling, loading, augmentation), over `steps` batches after `warmup`."
    it = iter(dl)
    for _ in range(warmup): next(it)
    sync(device)
    t = time.perf_counter()
    n = sum(len(next(it)[1]) for _ in range(steps))
    sync(device)
    return n / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', help='cuda (default when there is one) or cpu (a smoke run)')
    default = lambda k: f"GPU {GPU_DEFAULTS[k]}, CPU {CPU_SMOKE[k]}"
    p.add_argument('--steps', type=int, help=f"timed training batches of each precision ({default('steps')})")
    p.add_argument('--warmup', type=int, help=f"untimed batches before them ({default('warmup')})")
    p.add_argument('--rounds', type=int, help=f"rounds; each precision's best counts ({default('rounds')})")
    p.add_argument('--size', type=int, help=f"image side in pixels ({default('size')})")
    p.add_argument('--channels', help=f"ResNet-12's stage widths, comma-separated ({default('channels')})")
    p.add_argument('--tasks', type=int, default=6, help='5-way tasks of 5 + 5 images in a batch (meta_batch_size)')
    p.add_argument('--per-class', type=int, default=60, help='images of each base class')
    args = p.parse_args()
    device = bench_device(args, 'measures training', GPU_DEFAULTS, CPU_SMOKE)
    channels = tuple(int(c) for c in args.channels.split(','))
    if args.size < 16: p.error(f"--size must be at least 16: ResNet-12 halves the image 4 times, got {args.size}")
    if min(args.steps, args.warmup, args.rounds) < 1: p.error("--steps, --warmup and --rounds must be at least 1")

    n = args.warmup + args.steps
    dls = mtl_dls(synthetic_splits(args.size, N_BASE, args.per_class), train_ways=WAYS, train_shots=SHOTS, train_queries=QUERIES,
                  meta_batch_size=args.tasks, epoch_length=args.tasks * n, val_episodes=2, test_episodes=1, device=device)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, torch threads {torch.get_num_threads()}'
    print(f"{name}; torch {torch.__version__}; ResNet-12 {channels}, {args.size}px, batches of "
          f"{args.tasks * WAYS * (SHOTS + QUERIES)} images, {args.steps} timed steps after {args.warmup} warm-up steps, "
          f"{args.rounds} rounds")
    settings = {'fp32': {}, 'bf16 + channels_last': dict(precision='bf16', channels_last=True)}
    learners = {k: learner(dls, channels, **kw) for k, kw in settings.items()}
    rates = {k: [] for k in settings}
    for _ in range(args.rounds):
        for k, learn in learners.items(): rates[k].append(timed_fit(learn, args.warmup))
    loader = loader_rate(dls.train, args.warmup, args.steps, device)
    for k in settings: print(f"{k:21s} rounds: " + ' '.join(f"{v:.5g}" for v in rates[k]) + " img/s")
    fp32, bf16 = max(rates['fp32']), max(rates['bf16 + channels_last'])
    print(f"loader alone {loader:.5g} img/s")
    print(f"fp32 {fp32:.5g} img/s   bf16 + channels_last {bf16:.5g} img/s")
    if device.type != 'cuda':
        print("(a CPU smoke run: bf16 autocast on the CPU is emulated where the CPU lacks bf16 instructions; "
              "the ratio says nothing about a GPU)")
    print(f"ratio: {bf16 / fp32:.3f}")


if __name__ == '__main__':
    main()
