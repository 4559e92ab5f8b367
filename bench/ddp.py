"""Training images a second of 1 process and of N under torchrun (fastai's `distrib_ctx`), and the scaling efficiency.

Each process trains the same `mtl_learner` (ResNet-12, `--channels` wide) on the same batch a process: `--tasks` 5-way
tasks of 5 + 5 random `--size`-pixel images of 64 base classes held in memory, Lee19-augmented on its device. One
process runs `--tasks` tasks a step; N processes, launched by torchrun, N * `--tasks` (meta_batch_size is global), each
process `--tasks` of them, gradients averaged by DDP. Each run trains two epochs of `--steps` steps; the first warms up,
the second is timed from a barrier before its first step to one after its last. Images a second count the images of
all processes; the efficiency is rate(N) / (N * rate(1)), 1 for perfect scaling.
On a CPU machine the N processes share its cores: the ratio then only shows that the path works, not how it scales.
On N GPUs (one a process) it measures. The N processes are launched by torchrun even when N is 1, and a lone process
under torchrun is put on the data-parallel path (fsmtl's `MTLDistributedTrainer`), which `fsmtl train` leaves out for
one process: `--nproc 1` then runs that path (a process group, NCCL on a GPU, gloo on the CPU, and DDP) on one device
and measures what it costs. The torchrun run's process group and model wrapper are printed beside its rate.
Run: `python bench/ddp.py [--nproc N] [--channels 64,160,320,640] [--tasks T] [--steps S] [--size PX]`.
"""
import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from fastai.callback.core import Callback, CancelValidException

from _common import sync, synthetic_splits
from fsmtl.data.block import mtl_dls
from fsmtl.ddp import MTLDistributedTrainer
from fsmtl.distributed import init_distributed, is_main, world
from fsmtl.features import model_device
from fsmtl.learner import mtl_learner
from fsmtl.runlog import quiet

WAYS, PER_CLASS = 5, 10


class Clock(Callback):
    "Time the training of the last epoch, between barriers, and skip validation; note the process group and the model's wrapper."
    def before_train(self):
        self.group = dist.get_backend() if dist.is_initialized() else 'none'
        self.wrapper = type(self.learn.model).__name__
        if self.epoch != self.n_epoch - 1: return
        self._wait()
        self.t0 = time.perf_counter()

    def after_train(self):
        if self.epoch != self.n_epoch - 1: return
        self._wait()
        self.seconds = time.perf_counter() - self.t0

    def _wait(self):
        sync(model_device(self.learn.model))
        if world() > 1: dist.barrier()

    def before_validate(self): raise CancelValidException


def worker(args):
    "One process of a run: print the images a second of all processes (rank 0)."
    init_distributed()
    n, tasks = world(), args.tasks * world()
    dls = mtl_dls(synthetic_splits(args.size, 64, 20), train_ways=WAYS, train_shots=PER_CLASS // 2,
                  train_queries=PER_CLASS // 2, meta_batch_size=tasks, epoch_length=tasks * args.steps, test_ways=5,
                  test_shots=1, test_queries=1, val_episodes=1, test_episodes=1)
    torch.manual_seed(0)
    learn = quiet(mtl_learner(dls, arch_kwargs=dict(channels=args.channels), cbs=[Clock()]))
    learn.remove_cb(learn.episodic_eval)
    with learn.distrib_ctx(sync_bn=False):
        # fsmtl trains a lone process as it is, even under torchrun; the bench puts it on the data-parallel path anyway,
        # so that one device runs that path (process group, DDP) and measures what it costs
        if 'LOCAL_RANK' in os.environ and n == 1: learn.add_cb(MTLDistributedTrainer(sync_bn=False))
        learn.fit(2)
    if is_main():
        print(f"rate: {tasks * WAYS * PER_CLASS * args.steps / learn.clock.seconds:.2f} images/s on {n} process(es)")
        print(f"process group: {learn.clock.group}, model: {learn.clock.wrapper}")


def run(args, nproc=None):
    "Images a second of a run on `nproc` processes under torchrun, and its process group; `None`: one process, no launcher."
    me = [str(Path(__file__)), '--worker', '--channels', ','.join(map(str, args.channels)), '--tasks', str(args.tasks),
          '--steps', str(args.steps), '--size', str(args.size)]
    launch = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc)] if nproc else []
    res = subprocess.run([sys.executable, *launch, *me], capture_output=True, text=True, env=dict(os.environ))
    found = re.findall(r'rate: ([0-9.]+) images/s', res.stdout)
    what = f"the {nproc}-process torchrun run" if nproc else "the 1-process run"
    if res.returncode or not found: sys.exit(f"{what} failed:\n{res.stdout[-2000:]}{res.stderr[-3000:]}")
    return float(found[0]), re.findall(r'process group: .*', res.stdout)[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--nproc', type=int, default=2, help='processes of the parallel run (GPUs, when there are)')
    p.add_argument('--channels', type=lambda s: tuple(int(c) for c in s.split(',')), default=(64, 160, 320, 640))
    p.add_argument('--tasks', type=int, default=2, help='tasks a step a process')
    p.add_argument('--steps', type=int, default=8, help='steps an epoch')
    p.add_argument('--size', type=int, default=84)
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker: return worker(args)
    (one, _), (many, group) = run(args), run(args, args.nproc)
    where = f"{torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores (shared: the path, not scaling)"
    print(f"1 process: {one:.1f} images/s\n{args.nproc} process(es) under torchrun: {many:.1f} images/s ({group}), on {where}")
    print(f"ratio: {many / (args.nproc * one):.3f}")


if __name__ == '__main__':
    main()
