"`train(...)`: a whole run in one call; `evaluate_checkpoint`: its final test alone."
from __future__ import annotations
import dataclasses
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from fastai.torch_core import set_seed

from .checkpoint import Checkpoints, backbone_from_checkpoint, load_run_weights, read_checkpoint
from .config import (DataConfig, FitConfig, ModelConfig, RunConfig, TestConfig, device_of, option_values, renamed,
                     run_config)
from .data.block import FINAL_SHOTS, mtl_dls
from .data.benchmarks import get_benchmark
from .data.core import InputSpec
from .data.tasks import shot_counts
from .distributed import broadcast_object, init_distributed, is_main, local_batch, rank, rank_seed, world
from .evaluate import evaluate
from .learner import mtl_learner
from .files import RunLock
from .pretrained import FrozenEpochs
from .runlog import RunCSVLogger, quiet, tensorboard_cb, wandb_cb, write_json
from .runs import check_unused, resume_hint, resume_source, resumed_config, run_folder
from .scoring import EvalResults

__all__ = ['RECIPES', 'recipe_command', 'TrainResult', 'train', 'evaluate_checkpoint']

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
    config: RunConfig | None = None              # every option of the run, by phase

    def __str__(self):
        # epochs counted from 0, as in the epoch table and history.csv
        n = len(self.history)
        head = f"best epoch {self.best_epoch - 1} of epochs 0-{n - 1}" if self.best_epoch else "no epoch trained"
        lines = [head + (f", run in {self.run_dir}" if self.run_dir else '') + '; test accuracy, mean ± 95% CI:']
        for s, r in self.test.items():
            base = f"   untrained backbone: {self.untrained[s]!r}" if self.untrained and s in self.untrained else ''
            lines.append(f"{r}{base}")
        return '\n'.join(lines)


def _load_size(data: DataConfig, model: ModelConfig):
    "The side the benchmark's images are loaded at, in training and in its test: `size`, or None for their own."
    # a pretrained model's size is served by resizing batches on the device (mtl_learner); folders of mixed sizes load at `size`
    return None if model.pretrained and data.dataset != 'folder' else data.size


def _dls(cfg: RunConfig, device):
    d, t = cfg.data, cfg.test
    return mtl_dls(d.dataset, root=d.root, train_ways=d.train_ways, train_shots=d.train_shots, train_queries=d.train_queries,
                   meta_batch_size=d.meta_batch_size, epoch_length=d.epoch_length, test_ways=t.test_ways,
                   test_shots=t.test_shots, test_queries=t.test_queries, val_episodes=d.val_episodes,
                   test_episodes=t.test_episodes, size=_load_size(d, cfg.model), seed=d.seed, num_workers=d.num_workers,
                   device=device)


def _final_test(model, source, test: TestConfig, algo, seed: int, progress: bool) -> EvalResults:
    "The final test: 1- and 5-shot (and `test_shots`) on the test episodes (`source`'s own, or drawn from it)."
    shots = tuple(shot_counts([*FINAL_SHOTS, test.test_shots]))
    return evaluate(model, source, 'test', shots=shots, probe=test.probe(algo), ways=test.test_ways, queries=test.test_queries,
                    episodes=test.test_episodes, seed=seed, progress=progress)


def _configure(given: dict):
    "The run's checked configuration, and the checkpoint and folder it resumes."
    resumed = None   # a new run resumes nothing
    if given.get('resume'):
        folder = resume_source(option_values(given))
        resumed = Checkpoints.read_last(folder)
        cfg = RunConfig.of(resumed_config(renamed(given), option_values({}, resumed['config']), folder, resumed['epoch']))
    else: cfg = run_config(given)
    local_batch(cfg.data.meta_batch_size)
    return cfg, resumed, folder if resumed else run_folder(cfg.to_dict())


def _learner(cfg: RunConfig, device):
    "The DataLoaders and the learner of the configuration's algorithm."
    m, f, algo = cfg.model, cfg.fit, cfg.model.algo
    learn = mtl_learner(_dls(cfg, device), arch=m.arch, pretrained=m.pretrained, algorithm=algo, shots=cfg.data.train_shots,
                        opt=f.opt, lr=f.lr, wd=f.wd, arch_kwargs=m.arch_kwargs, probe=cfg.test.val_probe(algo),
                        precision=f.precision, channels_last=f.channels_last, size=cfg.data.size if m.pretrained else None)
    if f.freeze_epochs: learn.add_cb(FrozenEpochs(f.freeze_epochs))
    return learn if cfg.progress else quiet(learn)   # progress bars as asked


def _loggers(cfg: RunConfig, run_dir, start: int) -> list:
    "The run's log callbacks (CSV history, TensorBoard, wandb); writes config.json."
    if cfg.no_log or not is_main(): return []   # none with `no_log`, or on ranks but 0
    # wandb first: when it cannot start, the run stops before it has written anything
    wandb = [wandb_cb(run_dir, cfg.to_dict(), run_dir.name)] if cfg.wandb else []
    write_json(cfg.to_dict(), run_dir / 'config.json')
    # a resumed run's history.csv keeps its rows of the epochs before `start`
    cbs = [RunCSVLogger(run_dir / 'history.csv', append=start > 0, keep=start)]
    if (tb := tensorboard_cb(run_dir / 'tensorboard')) is not None: cbs.append(tb)
    return cbs + wandb


def _fit(learn, f: FitConfig, start: int, cbs):
    "Train from epoch `start` to `max_epochs` with the configured schedule."
    n, lr = f.max_epochs, f.lr
    if start >= n: return
    # launched by torchrun or accelerate launch, data parallel on all processes; in one process, as it is
    with learn.distrib_ctx(sync_bn=f.sync_bn):
        if f.scheduler == 'one_cycle': learn.fit_one_cycle(n, lr, cbs=cbs, start_epoch=start)
        elif f.scheduler == 'step': learn.fit_step(n, lr, f.decay_patience, f.decay_rate, cbs=cbs, start_epoch=start)
        else: learn.fit_plateau(n, lr, f.decay_patience, 1 / f.decay_rate, f.stop_patience, cbs=cbs, start_epoch=start)


def _write_results(res: TrainResult):
    "results.json of the run: the best epoch, the time of each stage and the test accuracies."
    summary = lambda rs, n=False: {f'{s}shot': dict(mean=r.mean, ci95=r.ci95, **({'episodes': len(r.accs)} if n else {}))
                                   for s, r in (rs or {}).items()}
    write_json(dict(epochs=len(res.history), best_epoch=res.best_epoch, seconds=res.seconds, test=summary(res.test, True),
                    untrained=summary(res.untrained)), res.run_dir / 'results.json')


def train(dataset: str | None = None,  # a benchmark name; None: glyphs, or a resumed run's
          **options                    # any of `options()`, by their names or the original code's (`ALIASES`)
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


def _train_in(cfg: RunConfig, resumed, run_dir) -> TrainResult:
    "The run of `train` in its locked folder: data, learner, fit, test, results."
    device, seed = device_of(cfg.gpu), cfg.data.seed
    if resumed is None: set_seed(seed)
    if not is_main(): cfg.progress = False
    t0 = time.perf_counter()
    learn = _learner(cfg, device)
    # the same initial weights on every process, then each its own training tasks and augmentation
    if resumed is None and world() > 1: set_seed(rank_seed(seed, rank()))
    dls, model = learn.dls, learn.model
    if cfg.load_path and resumed is None: load_run_weights(model, read_checkpoint(cfg.load_path), cfg.load_path)
    splits = dls.splits
    meta = dict(arch=cfg.model.arch, arch_kwargs=dict(cfg.model.arch_kwargs or {}), **splits.input.state(),
                n_base=splits.train.n_classes, norm_train_features=cfg.model.options.get('norm_train_features', False),
                config=cfg.to_dict())
    ckpt = Checkpoints(run_dir, meta, last=resumed)
    learn.add_cb(ckpt)
    cbs = _loggers(cfg, run_dir, ckpt.start_epoch)
    wandb_run = sys.modules['wandb'].run if cfg.wandb and not cfg.no_log and is_main() else None
    test = lambda: _final_test(model, dls, cfg.test, cfg.model.algo, seed, cfg.progress)
    try:
        untrained = test() if cfg.baseline and resumed is None else None
        ckpt.resume()
        t1 = time.perf_counter()
        _fit(learn, cfg.fit, ckpt.start_epoch, cbs)
        t2 = time.perf_counter()
        best = ckpt.load_best(model)
        results = test()
        res = TrainResult(learn, ckpt.history(), results, untrained, run_dir, best['epoch'] if best else None,
                          dict(setup=t1 - t0, training=t2 - t1, test=time.perf_counter() - t2), cfg)
        if not cfg.no_log and is_main(): _write_results(res)
        if wandb_run is not None: wandb_run.summary.update({f'test_acc_{s}shot': r.mean for s, r in results.items()})
        return res
    finally:
        if wandb_run is not None: wandb_run.finish()


def evaluate_checkpoint(load_path,  # a checkpoint file (best.pth, last.pth) or a run folder (its best.pth)
                        **options   # options that change the test (`TEST_OPTIONS`: dataset, root, test_* ...), by either names
                        ) -> EvalResults:  # mean ± 95% CI of each shot count
    "The final test alone: a checkpoint's 1- and 5-shot accuracy (mean ± 95% CI)."
    options.pop('test_only', None)
    p = Path(load_path).expanduser()
    st = read_checkpoint(p, prefer='best')
    # only the configs a test reads are made: testing needs neither the training optimiser nor its settings
    values = option_values(options, st.get('config'))
    data, arch, test = DataConfig.of(values), ModelConfig.of(values), TestConfig.of(values)
    test.probe(arch.algo)
    backbone = backbone_from_checkpoint(st, p / 'best.pth' if p.is_dir() else p)
    init_distributed()   # under torchrun, each process tests its share of the episodes
    splits = get_benchmark(data.dataset, root=data.root)
    if (size := _load_size(data, arch)) is not None:   # as training loaded them
        for s in ('train', 'val', 'test'): splits[s].size = size
    # a pretrained backbone's input (its size, mean and std), as its checkpoint records it, from the images as loaded
    if arch.pretrained:
        splits = splits.with_input(dataclasses.replace(InputSpec.from_state(st), image_size=splits.train.image_size()))
    # the algorithm's model around the backbone, with its trained head: a native test scores by it, a probe by the backbone
    model = arch.algo.model(backbone, backbone.num_features, st.get('n_base', 1), data.train_ways, data.train_shots,
                            data.train_queries)
    load_run_weights(model, st, p)
    return _final_test(model.to(device_of(values['gpu'])), splits, test, arch.algo, data.seed, values['progress'])
