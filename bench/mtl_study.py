"""MTL's training studied on validation episodes only: which choices make the multi-task learner train well.

Every row trains MTL from the same seed and initial backbone for the same `--epochs` of the same number of images
(`--epoch_length` 5-way tasks of 10 images a class; 10-way tasks come half as many), on the embedded glyphs
benchmark, with one choice changed from the first row, the defaults of `mtl_learner`: a zero head, RAdam at `--lr` for every
parameter group, unnormalised features, no weight decay, 6 tasks of 5 ways a batch, 5 + 5 images a class in a task,
300 images a base class ('glyphs'). The model is selected on `--select_episodes` validation episodes (seed 0), and
the table scores it on `--val_episodes` other validation episodes (seed 1), 5-way 5-shot by the logistic-regression
probe: accuracy ± 95% CI, and its paired difference from the first row on the same episodes. The test classes are
never used. Also: the last epoch's training loss and `task_acc`, and seconds trained. Equal epochs rather than equal
wall time: on a shared machine the time an epoch takes varies with the load, and MTL's gains come in a few epochs.
Seconds trained are the process's CPU seconds (one thread), which the load does not inflate.
Rows: `zero` (the default), `original` (the original code's head, kaiming-uniform x sqrt(n_base/ways)),
`unscaled` (kaiming-uniform), `head_lr x10`/`x0.1` (the head's learning rate against the backbone's),
`norm` (L2-normalised features, the original's `norm_train_features`), `cosine T=10` and `cosine T learned`
(features and head rows normalised, times a fixed or learned temperature, as Baseline++ and Meta-Baseline),
`head_wd` (L2 weight decay `--head_wd` on the head alone), `tasks 2`/`tasks 12` (tasks a batch), `ways 10` (10-way
tasks, 3 a batch: the same images a batch), `images 20` (20 images a class: 'glyphs-small'), `lazy rows` (the head's
rows that a batch leaves unused keep their values in its step, as a lazy Adam keeps them; RAdam's momentum otherwise
moves them for several steps after their last batch), `classes 64` (64 base classes of the 250, drawn with the seed,
as many as mini-ImageNet's, at 300 images each); `pretrain` (`--algorithm pretrain`: one softmax over all base classes,
on batches of the same number of images drawn at random), `pretrain SGD` (with SGD at 0.05, momentum 0.9, as RFS
pretrains), `pretrain tasks 25` (batches of 25 tasks' worth of images, 1,250: 3 steps an epoch rather than 16) and
`pretrain unscaled` (its head kaiming-uniform, as `nn.Linear` starts, rather than zero).
Run: `python bench/mtl_study.py [--epochs 5] [--rows zero,original,...] [--out table.md]`.
"""
import argparse
import dataclasses
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.torch_core import set_seed
from torch import nn

from bridge import Budget
from fsmtl.callbacks import TaskAccuracy
from fsmtl.data.benchmarks import get_benchmark
from fsmtl.data.block import mtl_dls
from fsmtl.data.core import Split
from fsmtl.evaluate import evaluate
from fsmtl.learner import mtl_learner, plateau_cbs
from fsmtl.pretrained import mtl_splitter
from fsmtl.runlog import quiet


class Cosine(nn.Module):
    "Cosine similarities of features and head rows times a temperature `t`, fixed or learned."
    def __init__(self, model, t: float, learned: bool):
        super().__init__()
        self.backbone, self.head = model.backbone, model.head
        with torch.no_grad(): nn.init.kaiming_uniform_(self.head, a=math.sqrt(5))   # a zero row has no direction
        self.t = nn.Parameter(torch.tensor(float(t)), requires_grad=learned)

    def forward(self, x): return self.t * F.linear(F.normalize(self.backbone(x), dim=-1), F.normalize(self.head, dim=-1))


class LastEpoch(Callback):
    "The training loss and `task_acc` of the last epoch that trained a batch."
    order = TaskAccuracy.order + 1

    def before_train(self): self.losses = []
    def after_batch(self):
        if self.training: self.losses.append(float(self.learn.loss))

    def after_train(self):
        if self.losses: self.loss, self.task_acc = sum(self.losses) / len(self.losses), self.learn.task_accuracy.value


class LazyRows(Callback):
    "The head's rows that the batch left unused keep their values through the optimiser's step."
    # their moment estimates still decay, so they are frozen, not reset: the head's row moves only in its own batches
    def before_step(self):
        head = self.learn.model.head
        self.unused = (head.grad == 0).all(1)
        self.kept = head.detach()[self.unused].clone()

    def after_step(self):
        with torch.no_grad(): self.learn.model.head[self.unused] = self.kept


def fewer_classes(splits, n: int, seed: int):
    "`splits` with `n` of its base classes, drawn with `seed`, and all their images."
    keep = np.sort(np.random.default_rng(seed).choice(splits.train.n_classes, n, replace=False))
    new = np.full(splits.train.n_classes, -1)
    new[keep] = np.arange(n)
    rows = np.flatnonzero(new[splits.train.labels] >= 0)
    train = Split(splits.train.items[rows], new[splits.train.labels[rows]], [splits.train.classes[c] for c in keep])
    return dataclasses.replace(splits, train=train)


ROWS = {'zero': {}, 'original': dict(original_head=True), 'unscaled': dict(init='kaiming'),
        'head_lr x10': dict(head_lr=10.), 'head_lr x0.1': dict(head_lr=0.1), 'norm': dict(norm_train_features=True),
        'cosine T=10': dict(cosine=(10., False)), 'cosine T learned': dict(cosine=(10., True)),
        'head_wd': dict(head_wd=True), 'tasks 2': dict(tasks=2), 'tasks 12': dict(tasks=12),
        'ways 10': dict(ways=10, tasks=3), 'images 20': dict(dataset='glyphs-small'), 'lazy rows': dict(lazy=True),
        'classes 64': dict(classes=64), 'pretrain': dict(all_classes=True),
        'pretrain SGD': dict(all_classes=True, opt='sgd', lr=0.05), 'pretrain tasks 25': dict(all_classes=True, tasks=25),
        'pretrain unscaled': dict(all_classes=True, init='kaiming')}


def row(name, args):
    "Train one row's learner for the budget; its validation accuracy, last loss and task_acc."
    o = ROWS[name]
    set_seed(args.seed)
    ways = o.get('ways', 5)
    data = get_benchmark(o.get('dataset', args.dataset), root=args.root)
    if 'classes' in o: data = fewer_classes(data, o['classes'], args.seed)
    dls = mtl_dls(data, train_ways=ways, meta_batch_size=o.get('tasks', 6),
                  epoch_length=args.epoch_length * 5 // ways, test_shots=5, val_episodes=args.select_episodes,
                  test_episodes=1, seed=args.seed, device='cpu')
    learn = quiet(mtl_learner(dls, arch_kwargs=dict(channels=tuple(int(c) for c in args.channels.split(','))),
                              original_head=o.get('original_head', False),
                              algorithm='pretrain' if o.get('all_classes') else 'mtl',
                              opt=o.get('opt', 'radam'),
                              norm_train_features=o.get('norm_train_features', False)))
    if o.get('init') == 'kaiming':
        with torch.no_grad(): nn.init.kaiming_uniform_(learn.model.head, a=math.sqrt(5))
    if 'cosine' in o:
        learn.model = Cosine(learn.model, *o['cosine'])
        learn.splitter = lambda m: mtl_splitter(m)[:-1] + [[m.head, m.t]]
    n = len(learn.splitter(learn.model))   # parameter groups, the head's last
    lr = o.get('lr', args.lr)
    lr = [lr] * (n - 1) + [lr * o.get('head_lr', 1.)]
    wd = [0.] * (n - 1) + [args.head_wd if o.get('head_wd') else 0.]
    budget, last = Budget(math.inf, time.process_time), LastEpoch()   # no time limit: the best epoch's weights, the log
    learn.fit(args.epochs, lr, wd=wd, cbs=[budget, last, *plateau_cbs(), *([LazyRows()] if o.get('lazy') else [])])
    learn.model.load_state_dict(budget.state)
    val = evaluate(learn.model, dls.splits, 'val', shots=5, episodes=args.val_episodes, seed=args.seed + 1, progress=False)
    return dict(row=name, val=(val.mean, val.ci95), accs=val.accs, loss=last.loss, task_acc=last.task_acc,
                best=1 + max(range(len(budget.log)), key=lambda i: budget.log[i][1]), wall=budget.log[-1][0])


def table(results) -> str:
    "The markdown table, with each row's paired difference from the first row's accuracy on the same episodes."
    first = results[0]['accs']
    lines = ['| row | val acc 5-shot | minus first row (paired) | train loss (last epoch) | task_acc (last epoch) '
             '| best epoch | CPU s trained |', '|' + '---|' * 7]
    for r in results:
        d = r['accs'] - first
        lines.append(f"| {r['row']} | {100 * r['val'][0]:.1f} ± {100 * r['val'][1]:.1f} "
                     f"| {100 * d.mean():+.1f} ± {100 * 1.96 * d.std() / math.sqrt(len(d)):.1f} | {r['loss']:.3f} "
                     f"| {r['task_acc']:.3f} | {r['best']} | {r['wall']:.0f} |")
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--rows', default=','.join(ROWS), help='rows of the table, by name')
    p.add_argument('--epochs', type=int, default=5, help='training epochs of each row')
    p.add_argument('--channels', default='16,32,32,64', help='ResNet-12 widths')
    p.add_argument('--lr', type=float, default=3e-3, help="RAdam's learning rate (the head's, times head_lr)")
    p.add_argument('--head_wd', type=float, default=1e-2, help='the head_wd row: L2 weight decay on the head')
    p.add_argument('--epoch_length', type=int, default=96, help='5-way tasks an epoch')
    p.add_argument('--select_episodes', type=int, default=30, help='validation episodes (seed 0) that select the epoch')
    p.add_argument('--val_episodes', type=int, default=300, help='validation episodes (seed 1) of the table')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--root', default='~/data')
    p.add_argument('--dataset', default='glyphs', help="the benchmark of the rows that do not set one ('images 20' does)")
    p.add_argument('--out', default=None, help='also write the table to this file')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for name in args.rows.split(','):
        t = time.perf_counter()
        results.append(row(name, args))
        r = results[-1]
        print(f"{name}: val {100 * r['val'][0]:.1f} ± {100 * r['val'][1]:.1f}, loss {r['loss']:.3f}, task_acc "
              f"{r['task_acc']:.3f}, best epoch {r['best']}, {time.perf_counter() - t:.0f} s in all", file=sys.stderr, flush=True)
    out = table(results)
    print(out)
    if args.out:
        with open(args.out, 'w') as f: f.write(out + '\n')


if __name__ == '__main__':
    main()
