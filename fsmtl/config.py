"The options of a run: one typed config a phase (data, model, fit, test), each checked where it is made."
from __future__ import annotations
import difflib
import math
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from fastai.torch_core import default_device

from .algorithms import algorithm_options, get_algorithm
from .learner import check_precision, get_opt

__all__ = ['ALIASES', 'SCHEDULERS', 'DataConfig', 'ModelConfig', 'FitConfig', 'TestConfig', 'RunConfig',
           'TEST_OPTIONS', 'options', 'renamed', 'option_values', 'run_config', 'device_of']

# the original code's names of the options that fastai names otherwise: old name -> name. `fp16=True` and `bf16=True`
# are `precision='fp16'` and `precision='bf16'`
ALIASES = {'model': 'arch', 'model_kwargs': 'arch_kwargs', 'optim': 'opt', 'weight_decay': 'wd',
           'val_epoch_length': 'val_episodes', 'final_test_epoch_length': 'test_episodes'}
_PRECISION_FLAGS = ('fp16', 'bf16')
SCHEDULERS = ('plateau', 'step', 'one_cycle')


def option(default, help: str, least=None, positive=False):
    "A field of a config: its default and help, and for a number the least value it takes, or that it is above 0."
    # an int `least` also asks for a whole number; a field whose default is None may also be None
    return field(default=default, metadata=dict(help=help, least=least, positive=positive))


def _name(k: str) -> str:
    "`k`, with its original name if it has one."
    old = [o for o, n in ALIASES.items() if n == k]
    return f"{k} ({old[0]})" if old else k


class _Config:
    "Checks its numbers, then `check`, when made; `of` takes its fields from all the options by name."
    def __post_init__(self):
        for f in fields(self):
            if 'help' in f.metadata: _check_number(self, f)
        self.check()

    def check(self): "Fail on values that contradict each other."

    @classmethod
    def of(cls, values: dict):  # every option by its name (`option_values`)
        "The config of this phase in `values`."
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def to_dict(self) -> dict:
        "Its options by name, as JSON takes them."
        return {f.name: str(v) if isinstance(v := getattr(self, f.name), Path) else v for f in fields(self)}


def _check_number(cfg, f):
    "Fail on a number of `cfg`'s field `f` out of range, naming the values it takes."
    least, positive, v = f.metadata['least'], f.metadata['positive'], getattr(cfg, f.name)
    if (least is None and not positive) or (v is None and f.default is None): return
    why = f"{_name(f.name)} must be %s, got {v!r}: {f.metadata['help']}"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (isinstance(least, int) and v != int(v)):
        raise ValueError(why % 'a finite number')
    if least is not None and v < least: raise ValueError(why % f'at least {least}')
    if positive and not v > 0: raise ValueError(why % 'above 0')


@dataclass
class DataConfig(_Config):
    "The benchmark, its images and its training tasks."
    dataset: str = option('glyphs', 'benchmark: glyphs (embedded), glyphs-small (its 20 images a class), cifarfs, fc100, '
                                 'mini-imagenet, tiered-imagenet, or folder')
    root: str = option('~/data', 'folder of the benchmarks (for folder: your folder of class folders)')
    size: int | None = option(None, 'resize images to this side; None keeps the benchmark\'s', least=8)
    num_workers: int | None = option(None, 'loader processes; None: 0 for in-memory benchmarks, else all cores', least=0)
    seed: int = option(0, 'seeds the initialisation and the training tasks, and fixes the validation and test episodes', least=0)
    train_ways: int = option(5, 'classes in a training task', least=2)
    train_shots: int = option(5, 'support images per class in a training task', least=0)
    train_queries: int = option(5, 'query images per class in a training task (MTL uses shots + queries alike)', least=0)
    meta_batch_size: int = option(6, 'tasks in a training batch (over all processes, when several train)', least=1)
    epoch_length: int = option(1600, 'training tasks in an epoch', least=1)
    val_episodes: int = option(400, 'validation episodes, scored after every epoch', least=1)

    def check(self):
        if self.train_shots + self.train_queries < 1:
            raise ValueError("train_shots + train_queries must be at least 1: MTL trains on the shots and queries of each class alike")
        if self.epoch_length < self.meta_batch_size:
            raise ValueError(f"epoch_length ({self.epoch_length} tasks) is less than one batch of meta_batch_size "
                             f"({self.meta_batch_size} tasks): raise epoch_length or lower meta_batch_size")


@dataclass
class ModelConfig(_Config):
    "The algorithm with its own options, and the backbone it trains."
    algorithm: str = option('mtl', 'a name of the registry: mtl, pretrain (one softmax over all base classes), or a meta-learner: '
                                'protonet, metaoptnet, r2d2, anil, maml (support: the first train_shots per class)')
    arch: str = option('resnet12', 'backbone: resnet12 or any timm architecture name')
    arch_kwargs: dict | None = option(None, 'keyword arguments of the architecture (timm.create_model), a dict')
    pretrained: bool | str = option(False, 'True: timm hub weights; a path: a local weights file. Images then get the model\'s '
                                        'size, mean and std')
    options: dict = field(default_factory=dict)   # the registered algorithms' own options (`algorithm_options`) by name

    def check(self):
        if self.arch_kwargs is not None and not isinstance(self.arch_kwargs, dict):
            raise ValueError(f"model_kwargs must be keyword arguments of the architecture, a dict (a JSON object at the shell, "
                             f"e.g. '{{\"channels\": [64, 160, 320, 640]}}'), got {self.arch_kwargs!r}")
        self.algo = get_algorithm(self.algorithm, **self.options)   # an unknown name, or an option it forbids, fails here

    @classmethod
    def of(cls, values: dict):  # every option by its name
        "The model config in `values`, with every registered algorithm's options."
        return super().of(dict(values, options={k: values[k] for k in algorithm_options() if k in values}))

    def to_dict(self) -> dict:
        "Its options by name, the algorithms' among them, as JSON takes them."
        d = super().to_dict()
        return dict(d, **d.pop('options'))


@dataclass
class FitConfig(_Config):
    "The optimiser, the schedule and how the training batches run."
    opt: str = option('radam', 'optimiser: sgd, sgdw, sgdp, adam, adamw, adamax, radam, adabound, adamp')
    lr: float = option(1e-3, 'learning rate (the peak of one_cycle)', positive=True)
    wd: float = option(0., 'weight decay', least=0.)
    scheduler: str = option('plateau', 'plateau (on episodic_acc, with early stopping), step, or one_cycle')
    decay_rate: float = option(0.1, 'plateau and step: the learning rate is multiplied by this', positive=True)
    decay_patience: int = option(4, 'plateau: epochs without gain before a drop; step: epochs between drops', least=1)
    stop_patience: int = option(15, 'plateau: epochs without gain before training stops', least=1)
    max_epochs: int = option(200, 'epochs at most', least=0)
    freeze_epochs: int = option(0, 'train only the head (backbone frozen, as fastai\'s freeze) for this many first epochs', least=0)
    precision: str = option('fp32', 'training batches in fp32, or in fp16 or bf16 mixed precision (--fp16, --bf16)')
    channels_last: bool = option(False, 'channels-last memory format')
    sync_bn: bool = option(False, 'several GPUs: BatchNorm statistics over the batches of all processes (SyncBatchNorm)')

    def check(self):
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}: use one of {', '.join(SCHEDULERS)}")
        check_precision(self.precision)
        if self.freeze_epochs > self.max_epochs:
            raise ValueError(f"freeze_epochs ({self.freeze_epochs}) is more than max_epochs ({self.max_epochs}): the backbone "
                             "would never train. Lower freeze_epochs, or set it to max_epochs to train the head alone")
        if self.decay_rate > 1: raise ValueError(f"decay_rate multiplies the learning rate, so it is at most 1, got {self.decay_rate}")
        get_opt(self.opt)   # an unknown optimiser, or one whose package is missing


@dataclass
class TestConfig(_Config):
    "The validation and test episodes, and the probe that scores them."
    test_ways: int = option(5, 'classes in a validation and test episode', least=2)
    test_shots: int = option(5, 'support images per class in validation (model selection); the final test also scores 1 and 5',
                          least=1)
    test_queries: int = option(15, 'query images per class in a validation and test episode', least=1)
    test_episodes: int = option(2000, 'test episodes of the final test', least=1)
    test_method: str = option('l2', 'probe on the features: l2 (logistic regression), sklearn (the same in scikit-learn), proto; '
                                 'native: a meta-learner\'s own head (validation keeps l2)')
    test_l2: float = option(3., 'C, the inverse L2 regularisation strength, of the logistic regression probe', positive=True)

    def probe(self, algo):  # the run's `Algorithm`
        "The probe of the final test, or 'native': `algo`'s own head."
        return algo.test_probe(self.test_method, self.test_l2)

    def val_probe(self, algo):  # the run's `Algorithm`
        "The probe of the validation episodes."
        return algo.val_probe(self.test_method, self.test_l2)


@dataclass
class RunConfig(_Config):
    "A run: the config of each phase, where the run is written and how it is shown."
    data: DataConfig = field(default_factory=DataConfig)    # the benchmark and its training tasks
    model: ModelConfig = field(default_factory=ModelConfig)  # the algorithm and its backbone
    fit: FitConfig = field(default_factory=FitConfig)       # the optimiser and the schedule
    test: TestConfig = field(default_factory=TestConfig)    # the validation and test episodes
    log_dir: str = option('runs', 'runs are written to a folder in here: checkpoints, history.csv, config.json, results.json')
    run_name: str | None = option(None, 'name of the run folder; default: dataset-arch-date-time')
    gpu: int | None = option(None, 'CUDA device number; None: the GPU when there is one; without CUDA training falls back to the CPU')
    load_path: str | None = option(None, 'a checkpoint: to test (test_only), to resume (resume), or whose weights start training')
    resume: bool = option(False, 'continue a stopped run from its last checkpoint (load_path, else the newest run in log_dir)')
    test_only: bool = option(False, 'run only the final test of the checkpoint at load_path')
    baseline: bool = option(False, 'also test the untrained backbone on the same episodes, to show the gain')
    no_log: bool = option(False, 'write no CSV, JSON, wandb or TensorBoard logs (checkpoints are still written)')
    wandb: bool = option(False, 'log to wandb: offline unless you have logged in; WANDB_MODE is honoured')
    progress: bool = option(True, 'progress bars and the epoch table')
    resumed: list = field(default_factory=list)   # each resume: its epoch and the options it changed, [old, new]

    def check(self):
        # the checks that span phases: the algorithm's, on the training tasks, and the probes it allows
        self.model.algo.check(self.data.train_shots, self.data.train_queries)
        self.test.probe(self.model.algo)
        self.test.val_probe(self.model.algo)

    @classmethod
    def of(cls, values: dict):  # every option by its name (`option_values`)
        "The run's config: each phase's from `values`."
        return cls(**{f.name: _PHASES[f.name].of(values) if f.name in _PHASES else values[f.name]
                      for f in fields(cls) if f.name in values or f.name in _PHASES})

    def to_dict(self) -> dict:
        "Every option by its name, each phase's among them, as config.json holds them."
        own = {k: v for k, v in super().to_dict().items() if k not in _PHASES}
        return {**{k: v for p in _PHASES for k, v in getattr(self, p).to_dict().items()}, **own}


_PHASES = dict(data=DataConfig, model=ModelConfig, fit=FitConfig, test=TestConfig)
# the options of a checkpoint's test (`evaluate_checkpoint`, `fsmtl test`)
TEST_OPTIONS = ('dataset', 'root', 'gpu', 'seed', *(f.name for f in fields(TestConfig)), 'size', 'num_workers')


def options() -> dict:
    "Every option of `train` and `fsmtl train` by its name: name -> (default, help); the registered algorithms' last."
    own = {f.name: (f.default, f.metadata['help']) for c in [*_PHASES.values(), RunConfig] for f in fields(c) if 'help' in f.metadata}
    return {**own, **algorithm_options()}


def renamed(given: dict  # options by their names or the original code's (`ALIASES`, fp16, bf16)
            ) -> dict:
    "`given` by the options' names; fails on an unknown name, naming the close one."
    known = [*options(), 'resumed', *ALIASES, *_PRECISION_FLAGS]
    if unknown := [k for k in given if k not in known]:
        hints = {k: difflib.get_close_matches(k, known, 1) for k in unknown}
        raise TypeError("unknown option(s): " + ', '.join(f"{k}" + (f" (did you mean {h[0]}?)" if h else '')
                                                           for k, h in hints.items()))
    if both := [(new, old) for old, new in ALIASES.items() if old in given and new in given]:
        raise TypeError(', '.join(f"give {new} or {old}, not both" for new, old in both))
    if all(given.get(k) for k in _PRECISION_FLAGS): raise ValueError("choose fp16 or bf16, not both")
    res = {ALIASES.get(k, k): v for k, v in given.items() if k not in _PRECISION_FLAGS}
    for k in _PRECISION_FLAGS:
        if given.get(k): res['precision'] = k
    return res


def option_values(given: dict,             # options by their names or the original code's
                  base: dict | None = None  # a run's own options (its config.json), by either names
                  ) -> dict:
    "Every option's value by its name: the defaults, updated by `base`, then by `given`."
    defaults = {k: v for k, (v, _) in options().items()}
    return {**defaults, 'resumed': [], **renamed(base or {}), **renamed(given)}


def run_config(given: dict,             # options by their names or the original code's
               base: dict | None = None  # a run's own options (its config.json), under either names
               ) -> RunConfig:
    "The checked config of a run."
    return RunConfig.of(option_values(given, base))


def device_of(gpu  # a CUDA index; None: fastai's default device; below 0: the CPU
              ) -> torch.device:
    "The device of `gpu`; without CUDA, the CPU with a warning."
    if gpu is None: return default_device()
    if int(gpu) < 0: return torch.device('cpu')
    if not torch.cuda.is_available():
        warnings.warn(f"gpu {gpu} was asked for but CUDA is not available: training on the CPU", stacklevel=3)
        return torch.device('cpu')
    return torch.device('cuda', int(gpu))
