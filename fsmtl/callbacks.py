"Callbacks of MTL training: `EpisodicEval`, `TaskAccuracy`, `StopOnNaN` and `AMP`."
from __future__ import annotations

import io
import warnings
from contextlib import nullcontext, redirect_stdout

import torch
from fastai.callback.core import Callback, CancelBatchException
from fastai.callback.fp16 import AMPMode, MixedPrecision
from fastai.callback.tracker import EarlyStoppingCallback, ReduceLROnPlateau
from fastai.learner import Recorder, ValueMetric
from fastcore.basics import store_attr
from fastcore.foundation import L

from .data.tasks import EpisodeDL, shot_counts
from .distributed import gather_episodes, is_main, shard_episodes
from .features import model_device
from .scoring import EvalResults, ProbeScorer

__all__ = ['EpisodicEval', 'TaskAccuracy', 'StopOnNaN', 'AMP', 'DDPReduceLROnPlateau', 'DDPEarlyStopping']


class EpisodicEval(Callback):
    "Score the validation episodes (`dls.valid`) as `episodic_acc` and `episodic_ci` (95% CI half-width)."
    order = Recorder.order - 1   # its metrics must exist when the Recorder names its columns and logs them

    def __init__(self,
                 every: int = 1,        # score every this many epochs, and after the last; other epochs show nan
                 shots=5,               # support images per class; a tuple like (1, 5) adds a column per shot count
                 probe='logistic',      # 'logistic' (= 'l2'), 'sklearn', 'proto', or a probe
                 chunk: int = 256):     # images per forward pass
        store_attr()
        if every < 1: raise ValueError(f"every must be at least 1, got {every}")
        self.shot_counts = shot_counts(shots)
        # `results`: the last scoring's `EvalResults`
        self.value, self.results, self.scorer, self._in_fit, self._quiet = {}, None, None, False, None

    def _names(self, s):
        "Metric names of shot count `s`: the largest is `episodic_acc`/`episodic_ci`, others carry their shots."
        tag = '' if s == self.shot_counts[-1] else f'_{s}shot'
        return f'episodic_acc{tag}', f'episodic_ci{tag}'

    def _add_metrics(self):
        have = set(self.learn.metrics.attrgot('name'))
        # the largest shot count's columns come first: they are the ones trackers usually monitor
        names = [n for s in reversed(self.shot_counts) for n in self._names(s)]
        new = [ValueMetric(lambda n=n: self.value.get(n, float('nan')), n) for n in names if n not in have]
        if new: self.learn.metrics = self.learn.metrics + new

    def before_fit(self):
        self._in_fit, self.value = True, {}
        self._add_metrics()

    def after_fit(self): self._in_fit = False

    def before_validate(self):
        self.scorer = None
        # lr_find, and get_preds or summary on other batches than the validation set's, are left to fastai alone
        if hasattr(self.learn, 'lr_finder') or self.learn.dl is not self.learn.dls.valid: return
        dl = self.learn.dl
        if not isinstance(dl, EpisodeDL) or dl.shots < self.shot_counts[-1]:
            raise ValueError(f"EpisodicEval scores dls.valid, which must be an EpisodeDL of at least {self.shot_counts[-1]} "
                             f"shots, as mtl_dls makes (test_shots): it is {type(dl).__name__}"
                             + (f" of {dl.shots} shots" if isinstance(dl, EpisodeDL) else ''))
        self._add_metrics()
        self.value = {}
        if self._in_fit and (self.epoch + 1) % self.every and self.epoch + 1 != self.n_epoch:
            # nothing to score this epoch, and no loss to compute on novel classes: fastai gets no batches, and its
            # progress bar's warning about them is silenced until `after_validate`
            self._quiet = warnings.catch_warnings()
            self._quiet.__enter__()
            warnings.filterwarnings('ignore', message='Your generator is empty', module='fastprogress')
            self.learn.dl = []
            return
        # `score_episodes` with fastai's loop (and its progress bar) as the loop: `before_batch` scores each batch of
        # episodes. Under torch.distributed, each rank scores its share and `after_validate` gathers all the accuracies
        dl = self.learn.dl = shard_episodes(dl)
        self.scorer = ProbeScorer(self.learn.model, self.shot_counts, self.probe, self.chunk).begin(dl)

    def before_batch(self):
        if self.training or self.scorer is None: return
        self.scorer.add(self.learn.xb[0].as_subclass(torch.Tensor))
        self.learn.yb = ()   # the Recorder then leaves the validation loss alone: there is none on novel classes
        raise CancelBatchException

    def after_validate(self):
        if self._quiet is not None: self._quiet.__exit__(None, None, None); self._quiet = None
        if self.scorer is None: return
        accs, dl, self.scorer = self.scorer.result(), self.learn.dl, None
        self.results = EvalResults.of(gather_episodes(accs, dl), dl)
        self.value = {n: v for s, r in self.results.items() for n, v in zip(self._names(s), (r.mean, r.ci95))}


class TaskAccuracy(Callback):
    "Report `task_acc`, the accuracy of the epoch's training tasks."
    # each task is scored over its own classes
    order = Recorder.order - 1

    # a value before any training epoch: `summary` and `get_preds` log metrics without one
    def __init__(self): self.value = float('nan')

    def before_fit(self):
        if 'task_acc' not in self.learn.metrics.attrgot('name'):
            self.learn.metrics = self.learn.metrics + [ValueMetric(lambda: self.value, 'task_acc')]

    def before_train(self): self.correct, self.total, self.value = 0, 0, float('nan')

    def after_loss(self):
        if not self.training: return
        with torch.no_grad():
            logits, y = self.learn.loss_func.task_logits(self.pred.detach(), *self.yb)
            # counted on the device: no host sync per batch
            self.correct = self.correct + (logits.argmax(1) == y).sum()
            self.total += len(y)

    def after_train(self):
        if self.total: self.value = int(self.correct) / self.total


class StopOnNaN(Callback):
    "Stop with a clear error when the training loss is not finite."
    # the checkpoints already written stay as they are. Not fastai's `TerminateOnNaNCallback`: it cancels the fit without a
    # word, and `train` would then test and report the weights of a run that diverged
    order = MixedPrecision.order + 1   # after AMP has closed its autocast context

    def after_loss(self):
        if not self.training or torch.isfinite(self.loss).all(): return
        saved = getattr(getattr(self.learn, 'checkpoints', None), 'last_path', None)
        kept = f" The last good checkpoint is {saved}." if saved is not None and saved.exists() else ''
        lr = self.opt.hypers[-1]['lr'] if self.opt else None
        fp32 = ' or train in fp32' if any(isinstance(cb, MixedPrecision) for cb in self.learn.cbs) else ''
        raise FloatingPointError(f"the training loss became {self.loss.detach().float().item()} at epoch {self.epoch}, batch "
                                 f"{self.iter + 1}: training stopped.{kept} Lower the learning rate (it was {lr:.3g}){fp32}.")


class AMP(MixedPrecision):
    "fastai's `MixedPrecision` on the model's own device (CUDA or CPU)."
    # it autocasts training batches only
    def __init__(self, amp_mode='bf16',  # 'bf16' or 'fp16'
                 **kwargs):              # passed to fastai's `MixedPrecision` (its gradient scaler's settings)
        super().__init__(amp_mode, **kwargs)

    def before_fit(self):
        device = model_device(self.learn.model).type
        dtype = torch.bfloat16 if self.amp_mode == AMPMode.BF16 else torch.float16
        if dtype == torch.bfloat16 and device == 'cuda' and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU does not support bfloat16: train with fp16 instead")
        if dtype == torch.float16 and device == 'cpu':
            warnings.warn("fp16 on the CPU is many times slower than fp32 (CPUs compute float16 in software): train with "
                          "bf16 (--bf16), or in fp32", stacklevel=2)
        self.kwargs['enabled'] = dtype == torch.float16   # bfloat16 has float32's range: no loss scaling
        self.autocast, self.entered = torch.autocast(device, dtype=dtype), False
        self.learn.scaler, self.scales = torch.amp.GradScaler(device, **self.kwargs), L()

    def before_batch(self):
        # validation extracts features in fp32 for the probes, and is cancelled before any loss would close the context
        if self.training: self.autocast.__enter__(); self.entered = True

    def after_loss(self): self._exit()
    def after_cancel_batch(self): self._exit()

    def _exit(self):
        if self.entered: self.autocast.__exit__(None, None, None); self.entered = False


class _MainPrints:
    "A fastai tracker that decides on every process, its message printed by rank 0 alone."
    def after_epoch(self):
        # every rank holds the same gathered metrics, so all decide alike; one line in the log, not one per rank
        with nullcontext() if is_main() else redirect_stdout(io.StringIO()): super().after_epoch()


class DDPReduceLROnPlateau(_MainPrints, ReduceLROnPlateau):
    "fastai's `ReduceLROnPlateau`; under torch.distributed rank 0 alone prints."


class DDPEarlyStopping(_MainPrints, EarlyStoppingCallback):
    "fastai's `EarlyStoppingCallback`; under torch.distributed rank 0 alone prints."
