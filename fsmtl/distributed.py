"Runs on several processes: ranks and their seeds, sharded episodes, objects gathered and broadcast."
from __future__ import annotations
import atexit
import io
import math

import numpy as np
import torch
import torch.distributed as dist
from fastai.torch_core import num_distrib, rank_distrib
from torch import nn

from .data.tasks import EpisodeDL, seeded_random

__all__ = ['world', 'rank', 'is_main', 'init_distributed', 'leave_distributed', 'rank_seed', 'local_batch', 'gather_objects',
           'broadcast_object', 'peer_failed', 'unwrap', 'shard_episodes', 'gather_episodes']


def _joined() -> bool: return dist.is_available() and dist.is_initialized()


def world() -> int:
    "Processes of the run; 1 when not launched on several."
    # the process group's size, else the launcher's `WORLD_SIZE`
    return dist.get_world_size() if _joined() else max(1, num_distrib())


def rank() -> int:
    "This process's rank; 0 in one process."
    # the process group's, else the launcher's `RANK`
    return dist.get_rank() if _joined() else rank_distrib()


def is_main() -> bool:
    "Whether this is rank 0, which writes the run's files."
    return rank() == 0


def init_distributed():
    "Join the process group that `torchrun` or `accelerate launch` set up, until the interpreter exits."
    # NCCL on GPUs, gloo on CPUs; nothing happens in one process
    # accelerate's state picks the backend and, on GPUs, this process's device, as its Accelerator later expects
    if num_distrib() > 1 and not _joined():
        from accelerate import PartialState
        PartialState(cpu=not torch.cuda.is_available())
        atexit.register(leave_distributed)


def leave_distributed():
    "Leave the process group, if this process is in one."
    # left to the interpreter's teardown, gloo's threads abort a process now and then at its exit, after a run that
    # succeeded ("terminate called without an active exception"), and torchrun then reports the run as failed
    if _joined(): dist.destroy_process_group()


def rank_seed(seed: int,   # the run's seed
              r: int):     # a rank
    "The seed of rank `r`'s training tasks and augmentation."
    # a run is reproducible for a given number of processes
    return int(np.random.SeedSequence([seed, r]).generate_state(1)[0])


def local_batch(meta_batch_size: int,   # tasks per step over all processes
                n: int | None = None    # processes; None: `world()`
                ) -> int:               # tasks per step on each process
    "Each process's share of the tasks of a step."
    # a `ValueError` with the fix when they do not divide evenly
    n = world() if n is None else n
    if meta_batch_size % n:
        lo, hi = meta_batch_size // n * n, (meta_batch_size // n + 1) * n
        raise ValueError(f"meta_batch_size {meta_batch_size} is the number of tasks a step over all {n} processes, so it must "
                         f"be a multiple of {n}: use {' or '.join(str(v) for v in (lo, hi) if v)}, or launch a number of "
                         "processes that divides it")
    return meta_batch_size // n


def _bytes(obj) -> bytes:
    # torch's own format: tensors inside plain pickles do not always survive torch.distributed's object collectives
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _object(data: bytes):
    # written by `_bytes` in a process of this run, so the full unpickler is safe
    return torch.load(io.BytesIO(data), map_location='cpu', weights_only=False)


def gather_objects(obj  # tensors, arrays, numbers and containers of them
                   ) -> list:
    "`obj` of every process, in rank order; `[obj]` in one process."
    # not accelerate's `gather_object`: it sends plain pickles (see `_bytes`), and flattens lists into one
    if not _joined() or dist.get_world_size() == 1: return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, _bytes(obj))
    return [_object(b) for b in out]


def broadcast_object(obj  # rank 0's is kept, the others' are ignored
                     ):
    "Rank 0's `obj` on every process; `obj` itself in one process."
    if not _joined() or dist.get_world_size() == 1: return obj
    box = [_bytes(obj)]
    dist.broadcast_object_list(box, 0)
    return _object(box[0])


def peer_failed(e: BaseException  # an error this process met
                ) -> bool:
    "Whether `e` reports that a peer process of the run is gone."
    # DDP's gradient hooks report a lost peer as a plain RuntimeError, in gloo's words
    return world() > 1 and (isinstance(e, dist.DistError) or any(w in str(e) for w in ('closed by peer', 'remote worker')))


def unwrap(model: nn.Module  # a model, perhaps in `DistributedDataParallel` or `DataParallel`
           ) -> nn.Module:
    "The model inside a data-parallel wrapper, else `model`."
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def shard_episodes(dl: EpisodeDL  # fixed episodes, the same on every process
                   ) -> EpisodeDL:
    "This rank's consecutive episodes of `dl`, in whole batches."
    # `dl` itself in one process, or when it is already a share
    if world() == 1 or not _joined() or getattr(dl, 'shard', None) is not None: return dl
    n = len(dl.episodes)
    # whole batches per rank: each rank's batches are batches of one process, so features and probes match it exactly
    per = math.ceil(math.ceil(n / dl.bs) / world()) * dl.bs
    lo, hi = min(n, rank() * per), min(n, (rank() + 1) * per)
    # a new loader seeds itself from Python's `random`, which draws the training tasks
    with seeded_random(None): out = dl.new(episodes=dl.episodes[lo:hi])
    out.shard = (lo, hi, n)
    return out


def gather_episodes(accs: dict,      # per-episode accuracies by shot count, of the episodes of `dl`
                    dl: EpisodeDL    # the episodes scored: a share from `shard_episodes`, or all of them
                    ) -> dict:       # per-episode accuracies of all the episodes, in their order
    "Per-episode accuracies of all ranks' shares, in episode order."
    # `accs` itself when `dl` is not a share
    if getattr(dl, 'shard', None) is None: return accs
    parts = gather_objects(accs)
    # an empty share (fewer episodes than ranks) must not change the others' dtype
    return {s: np.concatenate([p[s] for p in parts if len(p[s])] or [accs[s]]) for s in accs}
