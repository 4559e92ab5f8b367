"MTL's data-parallel trainer: fastai's `DistributedTrainer` for task batches and sharded episodes."
from __future__ import annotations

import torch
import torch.distributed as dist
from fastai.distributed import DistributedTrainer

from .data.tasks import EpisodeDL, TaskDL, seeded_random
from .distributed import local_batch, shard_episodes, unwrap

__all__ = ['MTLDistributedTrainer']


class MTLDistributedTrainer(DistributedTrainer):
    "fastai's `DistributedTrainer` for MTL."
    # each rank trains on its share of each step's tasks, and scores its share of the episodes
    def __init__(self, sync_bn=False,   # batch statistics over all processes (`nn.SyncBatchNorm`, GPUs only)
                 find_unused=lambda learn: True,  # learner -> whether some parameters may get no gradient in a step
                 **kwargs):             # passed to accelerate's `Accelerator`
        from accelerate import DistributedDataParallelKwargs
        self.find_unused, self.ddp_kwargs = find_unused, DistributedDataParallelKwargs()
        # without `cpu`, accelerate runs CPU processes side by side, each training alone
        super().__init__(sync_bn, **{'cpu': not torch.cuda.is_available(), 'kwargs_handlers': [self.ddp_kwargs], **kwargs})

    def before_fit(self):
        if self.sync_bn and self.accelerator.device.type == 'cpu':
            raise ValueError("sync_bn (SyncBatchNorm) runs on GPUs only: train on CPUs without it (sync_bn=False)")
        # decided here, with the fit's own callbacks: DDP waits for the gradients of parameters unused in a step unless it
        # looks for them, and looking when there are none makes every process print a warning
        self.ddp_kwargs.find_unused_parameters = self.find_unused(self.learn)
        super().before_fit()

    def _wrap_dl(self, dl):
        if getattr(dl, 'rank_share', False): return dl
        if isinstance(dl, EpisodeDL): return shard_episodes(dl)
        if not isinstance(dl, TaskDL): return super()._wrap_dl(dl)
        # the same steps per epoch as in one process, each of `meta_batch_size` tasks over all ranks
        bs = local_batch(dl.bs, self.accelerator.num_processes)
        with seeded_random(None): out = dl.new(bs=bs, n=len(dl) * bs)
        out.rank_share = True
        return out

    def after_loss(self):
        # the recorded loss, and what trackers of it see, is the mean over all the step's tasks, as in one process
        if self.training: self.learn.loss = self.accelerator.reduce(self.loss.detach().clone(), 'mean')

    def after_train(self):
        acc = getattr(self.learn, 'task_accuracy', None)
        if acc is None or not acc.total: return
        # task_acc over all the epoch's tasks, as in one process
        counts = torch.tensor([int(acc.correct), int(acc.total)], device=self.accelerator.device)
        acc.correct, acc.total = (int(v) for v in self.accelerator.reduce(counts, 'sum').tolist())

    def before_validate(self):
        super().before_validate()
        self._same_buffers()

    def after_fit(self):
        self._same_buffers()
        super().after_fit()

    def _same_buffers(self):
        "Rank 0's buffers (BatchNorm statistics) on every rank."
        # all ranks score, and end with, the weights rank 0 saves
        for b in unwrap(self.learn.model).buffers(): dist.broadcast(b.data, 0)
