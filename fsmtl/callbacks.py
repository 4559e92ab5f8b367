"Callbacks of MTL training: `EpisodicEval`, `TaskAccuracy`, `StopOnNaN` and `AMP`."
from __future__ import annotations

import warnings

import torch
from fastai.callback.core import Callback, CancelBatchException
from fastai.callback.fp16 import AMPMode, MixedPrecision
from fastai.learner import Recorder, ValueMetric
from fastcore.basics import store_attr
from fastcore.foundation import L

from .data.tasks import EpisodeDL
from .distributed import gather_episodes, shard_episodes
from .evaluate import EpisodeScorer, EvalResult, EvalResults, chunked_episode_dl, episodic_accuracy
from .features import extract_features, model_device

__all__ = ['EpisodicEval', 'TaskAccuracy', 'StopOnNaN', 'AMP']

# epochs that skip validation hand fastai an empty loader, on purpose
warnings.filterwarnings('ignore', message='Your generator is empty', module='fastprogress')


class EpisodicEval(Callback):
    "Score fixed validation episodes every `every` epochs and report `episodic_acc` and `episodic_ci` (95% CI half-width); `results` keeps the last `EvalResults`."
    order = Recorder.order - 1   # its metrics must exist when the Recorder names its columns and logs them

    def __init__(self,
                 every: int = 1,             # score every this many epochs, and after the last; other epochs show nan
                 episodes: int = 400,        # fixed validation episodes
                 ways: int = 5,              # classes in an episode
                 shots=5,                    # support images a class; a tuple like (1, 5) adds a column a shot count
                 queries: int = 15,          # query images a class
                 probe='logistic',           # 'logistic' (= 'l2'), 'sklearn', 'proto', or a probe
                 seed: int = 0,              # fixes the episodes
                 split: str = 'val',         # the split of the DataLoaders' benchmark to draw episodes from
                 chunk: int = 256):          # images loaded and passed forward at once
        store_attr()
        if every < 1: raise ValueError(f"every must be at least 1, got {every}")
        self.shot_counts = sorted({shots} if isinstance(shots, int) else set(shots))
        self.value, self.results, self._dl, self._in_fit = {}, None, None, False

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

    def episode_loader(self) -> EpisodeDL:
        "The validation episodes: drawn once from the DataLoaders' benchmark (`mtl_dls` sets `dls.splits`)."
        dls, device = self.learn.dls, model_device(self.learn.model)
        key = (id(dls), str(device))
        if self._dl is None or self._key != key:
            splits, most = getattr(dls, 'splits', None), self.shot_counts[-1]
            if splits is not None:
                self._dl = chunked_episode_dl(splits, self.split, self.ways, most, self.queries, self.episodes, self.seed,
                                              self.chunk, device)
            elif isinstance(dls.valid, EpisodeDL) and dls.valid.shots >= most:
                self._dl = dls.valid
            else:
                raise ValueError("EpisodicEval draws its episodes from the benchmark of DataLoaders made by mtl_dls "
                                 "(dls.splits), or uses dls.valid when it is an EpisodeDL with enough shots")
            self._key = key
        # under torch.distributed, this rank's share of the episodes; `after_validate` gathers all their accuracies
        return shard_episodes(self._dl)

    def before_fit(self):
        self._in_fit, self.value = True, {}
        self._add_metrics()

    def after_fit(self): self._in_fit = False

    def before_validate(self):
        self.scorer = None
        # lr_find, and get_preds or summary on other batches than the validation set's, are left to fastai alone
        if hasattr(self.learn, 'lr_finder') or self.learn.dl is not self.learn.dls.valid: return
        self._add_metrics()
        due = not self._in_fit or (self.epoch + 1) % self.every == 0 or self.epoch + 1 == self.n_epoch
        self.value = {}
        if not isinstance(self.learn.dls.valid, EpisodeDL):
            # the DataLoaders' own validation set is left to fastai; the episodes are scored beside it
            if due: self.value = self.score()
        elif due:
            # fastai's loop runs over the episodes (with its progress bar); `before_batch` takes their features
            dl = self.learn.dl = self.episode_loader()
            self.scorer = EpisodeScorer(dl.ways, dl.per_class, dl.queries, self.shot_counts, self.probe)
        else:
            self.learn.dl = []   # nothing to score this epoch, and no loss to compute on novel classes

    def before_batch(self):
        if self.training or self.scorer is None: return
        self.scorer.add(extract_features(self.learn.model, self.learn.xb[0], self.chunk))
        self.learn.yb = ()   # the Recorder then leaves the validation loss alone: there is none on novel classes
        raise CancelBatchException

    def after_validate(self):
        if self.scorer is not None: self.value, self.scorer = self._metrics(gather_episodes(self.scorer.result(), self.learn.dl)), None

    def score(self) -> dict:
        "Accuracy and CI half-width of each shot count on the validation episodes, by metric name."
        return self._metrics(episodic_accuracy(self.learn.model, self.episode_loader(), self.shot_counts,
                                               probe=self.probe, chunk=self.chunk))

    def _metrics(self, accs) -> dict:
        self.results = EvalResults({s: EvalResult(a, self.ways, s, self.queries) for s, a in accs.items()})
        return {name: v for s, r in self.results.items() for name, v in zip(self._names(s), (r.mean, r.ci95))}


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
    # the checkpoints already written stay as they are
    order = MixedPrecision.order + 1   # after AMP has closed its autocast context

    def after_loss(self):
        if not self.training or torch.isfinite(self.loss).all(): return
        saved = getattr(getattr(self.learn, 'checkpoints', None), 'last_path', None)
        kept = f" The last good checkpoint is {saved}." if saved is not None and saved.exists() else ''
        lr = self.opt.hypers[-1]['lr'] if self.opt else None
        raise FloatingPointError(f"the training loss became {self.loss.detach().float().item()} at epoch {self.epoch + 1}, batch {self.iter + 1}: "
                                 f"training stopped.{kept} Lower the learning rate (it was {lr:.3g}) or train in fp32.")


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
