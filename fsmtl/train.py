"`train(...)`: a whole run in one call; `evaluate_checkpoint`: its final test alone."
from __future__ import annotations
import dataclasses
import difflib
import math
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from fastai.torch_core import default_device, set_seed

from .algorithms import algorithm_options, get_algorithm
from .checkpoint import Checkpoints, backbone_from_checkpoint, load_run_weights, read_checkpoint
from .data.block import FINAL_SHOTS, mtl_dls
from .data.benchmarks import get_benchmark
from .data.core import InputSpec
from .data.tasks import shot_counts
from .distributed import broadcast_object, init_distributed, is_main, local_batch, rank, rank_seed, world
from .evaluate import evaluate
from .learner import get_opt, mtl_learner
from .files import RunLock
from .pretrained import FrozenEpochs
from .runlog import RunCSVLogger, quiet, tensorboard_cb, wandb_cb, write_json
from .runs import check_unused, resume_hint, resume_source, resumed_config, run_folder
from .scoring import EvalResults

__all__ = ['OPTIONS', 'SCHEDULERS', 'RECIPES', 'recipe_command', 'TrainResult', 'train', 'evaluate_checkpoint']

# The options of `train` and of `fsmtl train` that every algorithm shares, under the original code's names: name -> (default,
# help). Each algorithm of the registry adds its own (`all_options`).
OPTIONS = {
    'dataset': ('glyphs', 'benchmark: glyphs (embedded), glyphs-small (its 20 images a class), cifarfs, fc100, mini-imagenet, tiered-imagenet, or folder'),
    'root': ('~/data', 'folder of the benchmarks (for folder: your folder of class folders)'),
    'log_dir': ('runs', 'runs are written to a folder in here: checkpoints, history.csv, config.json, results.json'),
    'run_name': (None, 'name of the run folder; default: dataset-model-date-time'),
    'algorithm': ('mtl', 'a name of the registry: mtl, pretrain (one softmax over all base classes), or a meta-learner: protonet, metaoptnet, r2d2, anil, maml (support: the first train_shots per class)'),
    'model': ('resnet12', 'backbone: resnet12 or any timm architecture name'),
    'model_kwargs': (None, 'keyword arguments of the architecture (timm.create_model), a dict'),
    'pretrained': (False, 'True: timm hub weights; a path: a local weights file. Images then get the model\'s size, mean and std'),
    'freeze_epochs': (0, 'train only the head (backbone frozen, as fastai\'s freeze) for this many first epochs'),
    'gpu': (None, 'CUDA device number; None: the GPU when there is one; without CUDA training falls back to the CPU'),
    'sync_bn': (False, 'several GPUs: BatchNorm statistics over the batches of all processes (SyncBatchNorm)'),
    'seed': (0, 'seeds the initialisation and the training tasks, and fixes the validation and test episodes'),
    'train_ways': (5, 'classes in a training task'),
    'train_shots': (5, 'support images per class in a training task'),
    'train_queries': (5, 'query images per class in a training task (MTL uses shots + queries alike)'),
    'test_ways': (5, 'classes in a validation and test episode'),
    'test_shots': (5, 'support images per class in validation (model selection); the final test also scores 1 and 5'),
    'test_queries': (15, 'query images per class in a validation and test episode'),
    'meta_batch_size': (6, 'tasks in a training batch (over all processes, when several train)'),
    'epoch_length': (1600, 'training tasks in an epoch'),
    'val_epoch_length': (400, 'validation episodes, scored after every epoch'),
    'final_test_epoch_length': (2000, 'test episodes of the final test'),
    'test_method': ('l2', 'probe on the features: l2 (logistic regression), sklearn (the same in scikit-learn), proto; '
                          'native: a meta-learner\'s own head (validation keeps l2)'),
    'test_l2': (3., 'C, the inverse L2 regularisation strength, of the logistic regression probe'),
    'optim': ('radam', 'optimiser: sgd, sgdw, sgdp, adam, adamw, adamax, radam, adabound, adamp'),
    'lr': (1e-3, 'learning rate (the peak of one_cycle)'),
    'weight_decay': (0., 'weight decay'),
    'scheduler': ('plateau', 'plateau (on episodic_acc, with early stopping), step, or one_cycle'),
    'decay_rate': (0.1, 'plateau and step: the learning rate is multiplied by this'),
    'decay_patience': (4, 'plateau: epochs without gain before a drop; step: epochs between drops'),
    'stop_patience': (15, 'plateau: epochs without gain before training stops'),
    'max_epochs': (200, 'epochs at most'),
    'no_log': (False, 'write no CSV, JSON, wandb or TensorBoard logs (checkpoints are still written)'),
    'wandb': (False, 'log to wandb: offline unless you have logged in; WANDB_MODE is honoured'),
    'test_only': (False, 'run only the final test of the checkpoint at load_path'),
    'load_path': (None, 'a checkpoint: to test (test_only), to resume (resume), or whose weights start training'),
    'resume': (False, 'continue a stopped run from its last checkpoint (load_path, else the newest run in log_dir)'),
    'fp16': (False, 'float16 mixed precision for training batches'),
    'bf16': (False, 'bfloat16 mixed precision for training batches'),
    'channels_last': (False, 'channels-last memory format'),
    'size': (None, 'resize images to this side; None keeps the benchmark\'s'),
    'baseline': (False, 'also test the untrained backbone on the same episodes, to show the gain'),
    'num_workers': (None, 'loader processes; None: 0 for in-memory benchmarks, else all cores'),
    'progress': (True, 'progress bars and the epoch table'),
}
SCHEDULERS = ('plateau', 'step', 'one_cycle')


def all_options() -> dict:
    "Every option of `train` and `fsmtl train`: the shared `OPTIONS`, then the registered algorithms' own."
    return {**OPTIONS, **algorithm_options()}


# The original code's published recipes (ResNet-12, `--algorithm mtl`), each with the 5-way test accuracy (%, mean ±
# 95% CI) the paper reports for it: `train(r['dataset'], **r['options'])` or `fsmtl train` with `recipe_command(r)`.
# Each keeps the original code's head (`original_head`), so that it reproduces the paper.
RECIPES = tuple(dict(dataset=d, shots=s, options=dict(o, original_head=True), paper=p) for d, s, o, p in [
    ('mini-imagenet', 5, dict(norm_train_features=True, meta_batch_size=2, test_shots=5), '77.72 ± 0.09'),
    ('mini-imagenet', 1, dict(norm_train_features=True, test_shots=1), '59.84 ± 0.22'),
    ('tiered-imagenet', 5, dict(norm_train_features=True, train_queries=35, meta_batch_size=1, test_shots=5), '83.69 ± 0.02'),
    ('tiered-imagenet', 1, dict(norm_train_features=True, train_queries=35, meta_batch_size=2, test_shots=1), '67.11 ± 0.12'),
    ('cifarfs', 5, dict(norm_train_features=True, test_shots=5), '84.1 ± 0.1'),
    ('cifarfs', 1, dict(norm_train_features=True, train_queries=15, meta_batch_size=2, test_shots=1), '69.5 ± 0.3'),
    ('fc100', 5, dict(test_shots=5), '57.7 ± 0.3'),
    ('fc100', 1, dict(train_queries=4, train_shots=1, meta_batch_size=1, test_shots=1), '42.4 ± 0.2')])


def recipe_command(recipe: dict,   # one of `RECIPES`, or any dict with a `dataset` and `options`
                   **extra         # more options, e.g. `root='~/data'`
                   ) -> str:       # one line, flags as in the original code's README
    "The `fsmtl train` command line of `recipe`."
    opts = dict(recipe['options'], **extra)
    flags = [f'--{k}' if v is True else f'--{k} {v}' for k, v in opts.items() if v is not False]
    return ' '.join(['fsmtl train --dataset', recipe['dataset'], *flags])


@dataclass
class TrainResult:
    "What `train` returns: the learner with the best weights, its history and the test results."
    learner: object                              # the `Learner`, with the best checkpoint's weights
    history: pd.DataFrame                        # one row per epoch: losses, `task_acc`, `episodic_acc`, `episodic_ci`
    test: EvalResults                            # final test accuracy by shot count
    untrained: EvalResults | None = None         # the untrained backbone on the same episodes (`baseline=True`)
    run_dir: Path | None = None                  # the run's folder of checkpoints and logs
    best_epoch: int | None = None                # the epoch of the best checkpoint
    seconds: dict = field(default_factory=dict)  # time spent in each stage
    config: dict = field(default_factory=dict)   # every option of the run

    def __str__(self):
        # epochs counted from 0, as in the epoch table and history.csv
        n = len(self.history)
        head = f"best epoch {self.best_epoch - 1} of epochs 0-{n - 1}" if self.best_epoch else "no epoch trained"
        lines = [head + (f", run in {self.run_dir}" if self.run_dir else '') + '; test accuracy, mean ± 95% CI:']
        for s, r in self.test.items():
            base = f"   untrained backbone: {self.untrained[s]!r}" if self.untrained and s in self.untrained else ''
            lines.append(f"{r}{base}")
        return '\n'.join(lines)


def _options(given: dict, base: dict | None = None) -> dict:
    "The full configuration: the defaults, updated by `base`, then by `given`."
    # `base`: a resumed run's configuration
    options = all_options()
    unknown = [k for k in given if k not in options]
    if unknown:
        hints = {k: difflib.get_close_matches(k, options, 1) for k in unknown}
        raise TypeError("unknown option(s): " + ', '.join(f"{k}" + (f" (did you mean {h[0]}?)" if h else '')
                                                           for k, h in hints.items()))
    cfg = {k: v for k, (v, _) in options.items()}
    cfg.update(base or {})
    cfg.update(given)
    return cfg


# numeric options: name -> the least value it takes (size and num_workers may also be None)
_LEAST = {'train_ways': 2, 'test_ways': 2, 'train_shots': 0, 'train_queries': 0, 'test_shots': 1, 'test_queries': 1,
          'meta_batch_size': 1, 'epoch_length': 1, 'val_epoch_length': 1, 'final_test_epoch_length': 1, 'max_epochs': 0,
          'decay_patience': 1, 'stop_patience': 1, 'seed': 0, 'size': 8, 'num_workers': 0, 'weight_decay': 0.,
          'freeze_epochs': 0}
_POSITIVE = ('lr', 'test_l2', 'decay_rate')
_TEST_OPTIONS = ('test_ways', 'test_shots', 'test_queries', 'final_test_epoch_length', 'seed', 'size', 'num_workers',
                 'test_l2')


def _check_numbers(cfg, names):
    "Fail on the first option of `names` out of range, naming the values it takes."
    for k in names:
        v = cfg[k]
        if v is None and k in ('size', 'num_workers'): continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
                (k in _LEAST and isinstance(_LEAST[k], int) and v != int(v)):
            raise ValueError(f"{k} must be a finite number, got {v!r}: {OPTIONS[k][1]}")
        if k in _LEAST and v < _LEAST[k]: raise ValueError(f"{k} must be at least {_LEAST[k]}, got {v}: {OPTIONS[k][1]}")
        if k in _POSITIVE and not v > 0: raise ValueError(f"{k} must be above 0, got {v}: {OPTIONS[k][1]}")


def _check(cfg):
    "Fail before any work on options that cannot run."
    # an unknown algorithm, scheduler, probe or optimiser, a number out of range, or contradicting options
    if cfg['scheduler'] not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {cfg['scheduler']!r}: use one of {', '.join(SCHEDULERS)}")
    if cfg['fp16'] and cfg['bf16']: raise ValueError("choose fp16 or bf16, not both")
    _check_numbers(cfg, [*_LEAST, *_POSITIVE])
    algo = _algorithm(cfg)
    algo.check(cfg['train_shots'], cfg['train_queries'])
    if cfg['train_shots'] + cfg['train_queries'] < 1:
        raise ValueError("train_shots + train_queries must be at least 1: MTL trains on the shots and queries of each class alike")
    if cfg['epoch_length'] < cfg['meta_batch_size']:
        raise ValueError(f"epoch_length ({cfg['epoch_length']} tasks) is less than one batch of meta_batch_size "
                         f"({cfg['meta_batch_size']} tasks): raise epoch_length or lower meta_batch_size")
    if cfg['freeze_epochs'] > cfg['max_epochs']:
        raise ValueError(f"freeze_epochs ({cfg['freeze_epochs']}) is more than max_epochs ({cfg['max_epochs']}): the backbone "
                         "would never train. Lower freeze_epochs, or set it to max_epochs to train the head alone")
    if cfg['model_kwargs'] is not None and not isinstance(cfg['model_kwargs'], dict):
        raise ValueError(f"model_kwargs must be keyword arguments of the architecture, a dict (a JSON object at the shell, "
                         f"e.g. '{{\"channels\": [64, 160, 320, 640]}}'), got {cfg['model_kwargs']!r}")
    if cfg['decay_rate'] > 1: raise ValueError(f"decay_rate multiplies the learning rate, so it is at most 1, got {cfg['decay_rate']}")
    algo.test_probe(cfg['test_method'], cfg['test_l2'])
    algo.val_probe(cfg['test_method'], cfg['test_l2'])
    get_opt(cfg['optim'])
    local_batch(cfg['meta_batch_size'])


def _algorithm(cfg):
    "The configuration's algorithm, with its options."
    return get_algorithm(cfg['algorithm'], **{k: cfg[k] for k in algorithm_options()})


def _device(gpu):
    "The device of `gpu` (a CUDA index); without CUDA, the CPU with a warning."
    if gpu is None: return default_device()
    if int(gpu) < 0: return torch.device('cpu')
    if not torch.cuda.is_available():
        warnings.warn(f"gpu {gpu} was asked for but CUDA is not available: training on the CPU", stacklevel=3)
        return torch.device('cpu')
    return torch.device('cuda', int(gpu))


def _json_config(cfg: dict) -> dict:
    "The configuration with paths as strings, as JSON and `weights_only` checkpoints take it."
    return {k: str(v) if isinstance(v, Path) else v for k, v in cfg.items()}


def _load_size(cfg):
    "The side the benchmark's images are loaded at, in training and in its test: `size`, or None for their own."
    # a pretrained model's size is served by resizing batches on the device (mtl_learner); folders of mixed sizes load at `size`
    return None if cfg['pretrained'] and cfg['dataset'] != 'folder' else cfg['size']


def _dls(cfg, device):
    return mtl_dls(cfg['dataset'], root=cfg['root'], train_ways=cfg['train_ways'], train_shots=cfg['train_shots'],
                   train_queries=cfg['train_queries'], meta_batch_size=cfg['meta_batch_size'],
                   epoch_length=cfg['epoch_length'], test_ways=cfg['test_ways'], test_shots=cfg['test_shots'],
                   test_queries=cfg['test_queries'], val_episodes=cfg['val_epoch_length'],
                   test_episodes=cfg['final_test_epoch_length'], size=_load_size(cfg), seed=cfg['seed'],
                   num_workers=cfg['num_workers'], device=device)


def _final_test(model, source, cfg, progress) -> EvalResults:
    "The final test: 1- and 5-shot (and `test_shots`) on the test episodes (`source`'s own, or drawn from it)."
    shots = tuple(shot_counts([*FINAL_SHOTS, cfg['test_shots']]))
    episodes = dict(ways=cfg['test_ways'], queries=cfg['test_queries'], episodes=cfg['final_test_epoch_length'],
                    seed=cfg['seed'], progress=progress)
    probe = _algorithm(cfg).test_probe(cfg['test_method'], cfg['test_l2'])
    return evaluate(model, source, 'test', shots=shots, probe=probe, **episodes)


def _configure(given: dict):
    "The run's checked configuration, and the checkpoint and folder it resumes."
    if not given.get('resume'):
        cfg = _options(given)
        _check(cfg)
        return cfg, None, run_folder(cfg)   # a new run resumes nothing
    folder = resume_source(_options(given))
    resumed = Checkpoints.read_last(folder)
    cfg = resumed_config(given, _options({}, resumed['config']), folder, resumed['epoch'])
    _check(cfg)
    return cfg, resumed, folder


def _learner(cfg, device):
    "The DataLoaders and the learner of the configuration's algorithm."
    algo = _algorithm(cfg)
    learn = mtl_learner(_dls(cfg, device), arch=cfg['model'], pretrained=cfg['pretrained'], algorithm=algo,
                        shots=cfg['train_shots'], opt=cfg['optim'], lr=cfg['lr'], wd=cfg['weight_decay'],
                        arch_kwargs=cfg['model_kwargs'], probe=algo.val_probe(cfg['test_method'], cfg['test_l2']),
                        precision='fp16' if cfg['fp16'] else 'bf16' if cfg['bf16'] else 'fp32',
                        channels_last=cfg['channels_last'], size=cfg['size'] if cfg['pretrained'] else None)
    if cfg['freeze_epochs']: learn.add_cb(FrozenEpochs(cfg['freeze_epochs']))
    return learn if cfg['progress'] else quiet(learn)   # progress bars as asked


def _loggers(cfg, run_dir, start: int) -> list:
    "The run's log callbacks (CSV history, TensorBoard, wandb); writes config.json."
    if cfg['no_log'] or not is_main(): return []   # none with `no_log`, or on ranks but 0
    # wandb first: when it cannot start, the run stops before it has written anything
    wandb = [wandb_cb(run_dir, _json_config(cfg), run_dir.name)] if cfg['wandb'] else []
    write_json(_json_config(cfg), run_dir / 'config.json')
    # a resumed run's history.csv keeps its rows of the epochs before `start`
    cbs = [RunCSVLogger(run_dir / 'history.csv', append=start > 0, keep=start)]
    if (tb := tensorboard_cb(run_dir / 'tensorboard')) is not None: cbs.append(tb)
    return cbs + wandb


def _fit(learn, cfg, start: int, cbs):
    "Train from epoch `start` to `max_epochs` with the configured schedule."
    n, lr = cfg['max_epochs'], cfg['lr']
    if start >= n: return
    # launched by torchrun or accelerate launch, data parallel on all processes; in one process, as it is
    with learn.distrib_ctx(sync_bn=cfg['sync_bn']):
        if cfg['scheduler'] == 'one_cycle': learn.fit_one_cycle(n, lr, cbs=cbs, start_epoch=start)
        elif cfg['scheduler'] == 'step':
            learn.fit_step(n, lr, cfg['decay_patience'], cfg['decay_rate'], cbs=cbs, start_epoch=start)
        else:
            learn.fit_plateau(n, lr, cfg['decay_patience'], 1 / cfg['decay_rate'], cfg['stop_patience'], cbs=cbs,
                              start_epoch=start)


def _write_results(res: TrainResult):
    "results.json of the run: the best epoch, the time of each stage and the test accuracies."
    summary = lambda rs, n=False: {f'{s}shot': dict(mean=r.mean, ci95=r.ci95, **({'episodes': len(r.accs)} if n else {}))
                                   for s, r in (rs or {}).items()}
    write_json(dict(epochs=len(res.history), best_epoch=res.best_epoch, seconds=res.seconds, test=summary(res.test, True),
                    untrained=summary(res.untrained)), res.run_dir / 'results.json')


def train(dataset: str | None = None,  # a benchmark name; None: glyphs, or a resumed run's
          **options                    # any of `all_options()`, by the original code's names
          ) -> TrainResult:            # the learner, its history and the test results
    "Train a backbone, then test its best checkpoint."
    # by multi-task learning, or by `algorithm`; the test: 1- and 5-shot episodes, mean ± 95% CI
    given = dict(options, **({'dataset': dataset} if dataset is not None else {}))
    if given.get('test_only'): raise ValueError("test_only: call evaluate_checkpoint(load_path, ...), or fsmtl test")
    cfg, resumed, folder = _configure(given)
    init_distributed()
    # rank 0's folder name (its clock's), and rank 0 alone holds the folder's lock
    run_dir = broadcast_object(folder)
    with RunLock(run_dir) if is_main() else nullcontext():
        if resumed is None: check_unused(run_dir)
        with resume_hint(run_dir): return _train_in(cfg, resumed, run_dir)


def _train_in(cfg, resumed, run_dir) -> TrainResult:
    "The run of `train` in its locked folder: data, learner, fit, test, results."
    device = _device(cfg['gpu'])
    if resumed is None: set_seed(cfg['seed'])
    if not is_main(): cfg = dict(cfg, progress=False)
    t0 = time.perf_counter()
    learn = _learner(cfg, device)
    # the same initial weights on every process, then each its own training tasks and augmentation
    if resumed is None and world() > 1: set_seed(rank_seed(cfg['seed'], rank()))
    dls, model = learn.dls, learn.model
    if cfg['load_path'] and resumed is None: load_run_weights(model, read_checkpoint(cfg['load_path']), cfg['load_path'])
    splits = dls.splits
    meta = dict(arch=cfg['model'], arch_kwargs=dict(cfg['model_kwargs'] or {}), **splits.input.state(),
                n_base=splits.train.n_classes, norm_train_features=cfg['norm_train_features'], config=_json_config(cfg))
    ckpt = Checkpoints(run_dir, meta, last=resumed)
    learn.add_cb(ckpt)
    cbs = _loggers(cfg, run_dir, ckpt.start_epoch)
    wandb_run = sys.modules['wandb'].run if cfg['wandb'] and not cfg['no_log'] and is_main() else None
    try:
        untrained = _final_test(model, dls, cfg, cfg['progress']) if cfg['baseline'] and resumed is None else None
        ckpt.resume()
        t1 = time.perf_counter()
        _fit(learn, cfg, ckpt.start_epoch, cbs)
        t2 = time.perf_counter()
        best = ckpt.load_best(model)
        results = _final_test(model, dls, cfg, cfg['progress'])
        res = TrainResult(learn, ckpt.history(), results, untrained, run_dir, best['epoch'] if best else None,
                          dict(setup=t1 - t0, training=t2 - t1, test=time.perf_counter() - t2), cfg)
        if not cfg['no_log'] and is_main(): _write_results(res)
        if wandb_run is not None: wandb_run.summary.update({f'test_acc_{s}shot': r.mean for s, r in results.items()})
        return res
    finally:
        if wandb_run is not None: wandb_run.finish()


def evaluate_checkpoint(load_path,  # a checkpoint file (best.pth, last.pth) or a run folder (its best.pth)
                        **options   # options of `all_options()` that change the test (dataset, root, test_* ...)
                        ) -> EvalResults:  # mean ± 95% CI of each shot count
    "The final test alone: a checkpoint's 1- and 5-shot accuracy (mean ± 95% CI)."
    options.pop('test_only', None)
    p = Path(load_path).expanduser()
    st = read_checkpoint(p, prefer='best')
    # only the test's options are checked: testing needs neither the training optimiser nor its settings
    cfg = _options(options, st.get('config'))
    _check_numbers(cfg, _TEST_OPTIONS)
    algo = _algorithm(cfg)
    algo.test_probe(cfg['test_method'], cfg['test_l2'])
    backbone = backbone_from_checkpoint(st, p / 'best.pth' if p.is_dir() else p)
    init_distributed()   # under torchrun, each process tests its share of the episodes
    splits = get_benchmark(cfg['dataset'], root=cfg['root'])
    if (size := _load_size(cfg)) is not None:   # as training loaded them
        for s in ('train', 'val', 'test'): splits[s].size = size
    # a pretrained backbone's input (its size, mean and std), as its checkpoint records it, from the images as loaded
    if cfg['pretrained']:
        splits = splits.with_input(dataclasses.replace(InputSpec.from_state(st), image_size=splits.train.image_size()))
    # the algorithm's model around the backbone, with its trained head: a native test scores by it, a probe by the backbone
    model = algo.model(backbone, backbone.num_features, st.get('n_base', 1), cfg['train_ways'], cfg['train_shots'],
                       cfg['train_queries'])
    load_run_weights(model, st, p)
    return _final_test(model.to(_device(cfg['gpu'])), splits, cfg, cfg['progress'])
