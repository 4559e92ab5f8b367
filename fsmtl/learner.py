"Optimisers by name, the resumable `MTLLearner`, and `mtl_learner`: the learner of any registered algorithm."
from __future__ import annotations
import dataclasses
import math
from functools import partial

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import ParamScheduler
from fastai.callback.training import BnFreeze
from fastai.data.core import DataLoaders
from fastai.learner import Learner, Recorder
from fastai.optimizer import SGD, Adam, OptimWrapper, RAdam
from fastcore.basics import patch
from fastcore.meta import delegates

from .algorithms import algorithm_options, get_algorithm
from .callbacks import AMP, DDPEarlyStopping, DDPReduceLROnPlateau, EpisodicEval, StopOnNaN, TaskAccuracy
from .data.core import FewShotSplits, Split
from .ddp import MTLDistributedTrainer
from .distributed import rank, world
from .models import create_backbone
from .pretrained import FrozenEpochs, follow_input, input_config, mtl_splitter
from .progress import interactive
from .runlog import EpochTable

__all__ = ['OPTIMIZERS', 'TORCH_OPTIMIZER', 'get_opt', 'PRECISIONS', 'check_precision', 'MTLLearner', 'InputOnly', 'mtl_learner', 'meta_learner', 'plateau_cbs', 'step_sched']


# The original code's optimiser names. fastai's decouple_wd=False is torch's L2 weight decay, True the decoupled (AdamW) kind;
# torch's own optimisers go through fastai's `OptimWrapper`, as fastai documents.
OPTIMIZERS = {
    'sgd': partial(SGD, mom=0.9, decouple_wd=False),
    'sgdw': partial(SGD, mom=0.9, decouple_wd=True),
    'adam': partial(Adam, decouple_wd=False),
    'adamw': partial(Adam, decouple_wd=True),
    'radam': partial(RAdam, decouple_wd=False),
    'adamax': partial(OptimWrapper, opt=torch.optim.Adamax),
}
# the torch-optimizer package's, imported when asked for: name -> (its class, its defaults)
TORCH_OPTIMIZER = {'sgdp': ('SGDP', dict(momentum=0.9)), 'adabound': ('AdaBound', {}), 'adamp': ('AdamP', {})}


def get_opt(name: str):  # an optimiser name of `OPTIMIZERS` or `TORCH_OPTIMIZER`, in any case
    "The fastai optimiser function of an optimiser named as in the original code."
    key = str(name).lower()
    if key in OPTIMIZERS: return OPTIMIZERS[key]
    if key not in TORCH_OPTIMIZER:
        raise ValueError(f"unknown optimiser {name!r}: use one of {', '.join([*OPTIMIZERS, *TORCH_OPTIMIZER])}")
    try: import torch_optimizer
    except ImportError as e:
        raise ImportError(f"the {key} optimiser comes from the torch-optimizer package: pip install torch-optimizer==0.3.0, "
                          f"or choose one of {', '.join(OPTIMIZERS)}") from e
    cls, defaults = TORCH_OPTIMIZER[key]
    return partial(OptimWrapper, opt=partial(getattr(torch_optimizer, cls), **defaults))


# of training batches: float32, or mixed precision with float16 or bfloat16
PRECISIONS = ('fp32', 'fp16', 'bf16')


def check_precision(precision: str):  # one of `PRECISIONS`
    "Fail on a precision that is not one of `PRECISIONS`."
    if precision not in PRECISIONS: raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")


class MTLLearner(Learner):
    "fastai's `Learner` that resumes a fit: `fit(start_epoch=k)`."
    # the epochs before `k` are not logged
    def fit(self,
            n_epoch: int,      # epochs, counting those before `start_epoch`
            lr=None,           # learning rate; None: the learner's
            wd=None,           # weight decay; None: the learner's
            cbs=None,          # more callbacks for this fit
            reset_opt=False,   # a new optimiser
            start_epoch=0):    # the epoch to resume at
        "fastai's `fit`, resumed at `start_epoch`."
        # the schedules run as if the epochs before had run
        # fastai's SkipToEpoch cancels earlier epochs one by one, and each cancelled epoch still adds a row to the history
        self._start_epoch = start_epoch
        try: super().fit(n_epoch, lr=lr, wd=wd, cbs=cbs, reset_opt=reset_opt)
        finally: self._start_epoch = 0

    def to_distributed(self,
                       sync_bn=True,  # batch statistics over all processes (`nn.SyncBatchNorm`, GPUs only)
                       **kwargs):     # passed to accelerate's `Accelerator`
        "fastai's `to_distributed` with `MTLDistributedTrainer`."
        # `distrib_ctx` calls it; only rank 0 shows progress
        # one process (torchrun --nproc_per_node 1) trains as it is, as fastai's `detach_distributed` expects
        if world() < 2: return self
        self.add_cb(MTLDistributedTrainer(sync_bn, _may_leave_unused, **kwargs))
        if rank(): self.remove_cbs([cb for cb in self.cbs if isinstance(cb, (ProgressCallback, EpochTable))])
        return self

    def export(self,
               fname='export.pkl',  # file name, under the learner's `path`
               **kwargs):           # passed to fastai's `Learner.export` (pickle_module, pickle_protocol)
        "fastai's `export`, with only the input (size, mean, std) of the DataLoaders (`InputOnly`)."
        # fastai's transforms dispatch through locks that cannot be pickled: the loaders stay behind
        old, self.dls = self.dls, InputOnly.of(self.dls)
        try: super().export(fname, **kwargs)
        finally: self.dls = old

    def _do_fit(self):
        from fastai.callback.core import CancelEpochException
        start = getattr(self, '_start_epoch', 0)
        # fastprogress starts its epoch clock at update(0), which a fit resumed at a later epoch never calls
        if start and getattr(getattr(self, 'progress', None), 'mbar', None) is not None: self.progress.mbar.update(0)
        for epoch in range(start, self.n_epoch):
            self.epoch = epoch
            self._with_events(self._do_epoch, 'epoch', CancelEpochException)


def _may_leave_unused(learn) -> bool:
    "Whether a step of `learn`'s fit may leave parameters without a gradient."
    # its algorithm's (a meta-learner's head may go unused in a step); frozen epochs leave the backbone without gradients
    return learn.algorithm.may_leave_unused or any(isinstance(cb, FrozenEpochs) for cb in learn.cbs)


class InputOnly(DataLoaders):
    "Empty DataLoaders keeping an exported learner's input."
    # no loaders, only `splits`: an empty benchmark with the input's size, mean and std
    @classmethod
    def of(cls, dls):  # DataLoaders from `mtl_dls`
        "The input of `dls`, without images."
        # its `splits`' `InputSpec`
        s, i = dls.splits, dls.splits.input
        empty = lambda: Split(np.zeros((0, i.image_size, i.image_size, 3), np.uint8), [], [])
        res = cls(path=dls.path, device=dls.device)
        res.splits = FewShotSplits(s.name, empty(), empty(), empty()).with_input(i)
        return res

    def new_empty(self):
        "Itself: there are no loaders to empty."
        return self


def plateau_cbs(patience: int = 4,         # epochs without a gain in `monitor` before the learning rate drops
                factor: float = 10.,       # the learning rate is divided by this
                stop_patience: int = 15,   # epochs without a gain before training stops
                monitor: str = 'episodic_acc'):  # the metric watched
    "The original code's plateau schedule as fastai callbacks."
    return [DDPReduceLROnPlateau(monitor=monitor, comp=np.greater, patience=patience, factor=factor),
            DDPEarlyStopping(monitor=monitor, comp=np.greater, patience=stop_patience)]


def step_sched(lr: float,      # the initial learning rate
               every: int,     # epochs between drops
               rate: float,    # multiplies the learning rate at each drop
               n_epoch: int):  # epochs of the fit
    "A fastai schedule multiplying `lr` by `rate` every `every` epochs."
    # a function of the fraction of training done
    return lambda pos: lr * rate ** math.floor(pos * n_epoch / every + 1e-9)


@patch
@delegates(MTLLearner.fit)
def fit_plateau(self: Learner,
                n_epoch: int,             # the most epochs; early stopping may end sooner
                lr=None,                  # learning rate; None: the learner's
                patience: int = 4,        # epochs without a gain in `episodic_acc` before the learning rate drops
                factor: float = 10.,      # the learning rate is divided by this
                stop_patience: int = 15,  # epochs without a gain before training stops
                cbs=None,                 # more callbacks for this fit
                **kwargs):                # passed to `fit`: wd, reset_opt, start_epoch
    "Fit with the original code's plateau schedule on `episodic_acc` (see `plateau_cbs`)."
    self.fit(n_epoch, lr, cbs=plateau_cbs(patience, factor, stop_patience) + list(cbs or []), **kwargs)


@patch
@delegates(MTLLearner.fit)
def fit_step(self: Learner,
             n_epoch: int,       # epochs
             lr=None,            # the initial learning rate; None: the learner's
             every: int = 4,     # epochs between drops
             rate: float = 0.1,  # the learning rate is multiplied by this at each drop
             cbs=None,           # more callbacks for this fit
             **kwargs):          # passed to `fit`: wd, reset_opt, start_epoch
    "Fit with the learning rate multiplied by `rate` every `every` epochs."
    lr = self.lr if lr is None else lr
    self.fit(n_epoch, lr, cbs=[ParamScheduler({'lr': step_sched(lr, every, rate, n_epoch)})] + list(cbs or []), **kwargs)


@patch
def history(self: Recorder) -> pd.DataFrame:
    "One row per epoch (from 0) of the last fit's losses and metrics."
    names = [n for n in self.metric_names[1:] if n != 'time']   # the Recorder keeps no time in its values
    return pd.DataFrame(self.values, columns=names).rename_axis('epoch')


@patch
def plot_episodic(self: Recorder,
                  ax=None):  # matplotlib axes to draw on; None: a new figure
    "Plot `episodic_acc` per epoch (from 1) with its 95% CI as error bars."
    h = self.history()
    if 'episodic_acc' not in h: raise ValueError("no episodic_acc in this learner's history: add EpisodicEval to its callbacks")
    h = h.dropna(subset=['episodic_acc'])
    if ax is None: _, ax = plt.subplots(figsize=(5, 3))
    ax.errorbar(h.index + 1, 100 * h['episodic_acc'], yerr=100 * h.get('episodic_ci', 0), marker='o', capsize=3)
    ax.set(xlabel='epoch', ylabel='episodic accuracy (%)', title='validation episodes, mean ± 95% CI')
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    return ax


@delegates(Learner, but=['model', 'loss_func', 'opt_func', 'splitter'])
def mtl_learner(dls,                          # DataLoaders from `mtl_dls`
                arch: str = 'resnet12',       # a timm architecture (fsmtl registers resnet12)
                pretrained=False,             # True: timm's hub weights; a path: a local weights file
                algorithm='mtl',              # a name of `ALGORITHMS` or an `Algorithm`: its model and loss
                shots: int | None = None,     # support images of a class in a training task; None: the `train_shots` of `mtl_dls`
                opt='radam',                  # an optimiser name of `OPTIMIZERS`, or a fastai optimiser function
                lr: float = 1e-3,             # learning rate
                wd: float = 0.,               # weight decay
                cbs=None,                     # more callbacks
                arch_kwargs: dict | None = None,  # keyword arguments of the architecture (`timm.create_model`)
                probe='logistic',             # probe of the validation episodes
                eval_every: int = 1,          # score the validation episodes every this many epochs
                precision: str = 'fp32',      # 'fp32', 'fp16' or 'bf16' (mixed precision of training batches)
                channels_last: bool = False,  # the model and its inputs in channels-last memory format
                size: int | None = None,      # side of the model's input; None: the pretrained model's, else the data's
                mean=None,                    # per-channel mean; None: the pretrained model's, else the benchmark's
                std=None,                     # per-channel std; None: the pretrained model's, else the benchmark's
                interpolation: str | None = None,  # filter of the batch resize; None: the pretrained model's, else bilinear
                train_bn: bool = True,        # train batch-norm layers of a frozen backbone (False also keeps their statistics)
                **kwargs                      # options of the algorithm (norm_train_features, adaptation_lr ...), the rest to fastai's `Learner`
                ) -> MTLLearner:              # call `fit_one_cycle`, `fine_tune`, `fit_plateau`, `evaluate` ... on it
    "A fastai `Learner` training a backbone by `algorithm` (MTL by default), scored by `episodic_acc`."
    splits = getattr(dls, 'splits', None)
    if splits is None: raise ValueError("mtl_learner needs DataLoaders made by mtl_dls (they carry dls.splits)")
    train = dls.train
    shots = getattr(dls, 'train_shots', None) if shots is None else shots
    if shots is None: raise ValueError("give shots=, the support images of a class in a training task")
    queries = train.per_class - shots
    known = algorithm_options()
    algo = get_algorithm(algorithm, **{k: kwargs.pop(k) for k in list(kwargs) if k in known})
    algo.check(shots, queries)
    train.pooled = algo.pooled   # pretraining draws its batches' images at random, the others whole tasks
    opt_func = opt if callable(opt) else get_opt(opt)
    check_precision(precision)
    backbone, nf = create_backbone(arch, pretrained, **(arch_kwargs or {}))
    given = {k: v for k, v in dict(size=size, mean=mean, std=std, interpolation=interpolation).items() if v is not None}
    if pretrained: follow_input(dls, input_config(backbone, splits.train.image_size(), **given))
    elif given: follow_input(dls, dataclasses.replace(splits.input, **given))
    model = algo.model(backbone, nf, splits.train.n_classes, train.ways, shots, queries)
    extra = [EpisodicEval(every=eval_every, shots=dls.test_shots, probe=probe), TaskAccuracy(), StopOnNaN()]
    if precision != 'fp32': extra.append(AMP(precision))
    if channels_last: extra.append(ChannelsLast())
    # fastai's convention: a frozen backbone's batch-norm layers train, unless train_bn=False, which also keeps their statistics
    if not train_bn: extra.append(BnFreeze())
    learn = MTLLearner(dls, model, loss_func=algo.loss(train.ways, shots, queries), opt_func=opt_func, lr=lr, wd=wd,
                       splitter=mtl_splitter, train_bn=train_bn, cbs=extra + list(cbs or []), **kwargs)
    learn.algorithm = algo
    if not interactive() and hasattr(learn, 'progress'):
        # bars redrawn into a file or a scheduler's log are noise: there, the epoch table alone
        learn.remove_cb(learn.progress)
        learn.add_cb(EpochTable())
    return learn


@delegates(mtl_learner)
def meta_learner(dls,                          # DataLoaders from `mtl_dls`
                 algorithm='protonet',         # a name of `ALGORITHMS` or an `Algorithm`
                 **kwargs                      # its options (adaptation_lr, svm_C ...) and `mtl_learner`'s: arch, opt, lr, probe ...
                 ) -> MTLLearner:
    "`mtl_learner` training by a meta-learning `algorithm` on the same task batches."
    return mtl_learner(dls, algorithm=algorithm, **kwargs)
