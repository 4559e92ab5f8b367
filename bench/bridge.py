"""MTL against meta-learning on the same data, backbone, schedule and time budget: one table.

Each algorithm (`--algorithms`; default mtl, pretrain, protonet, r2d2, anil, maml, and metaoptnet when qpth is installed)
trains in its own child process, so that its peak memory is its own, on the embedded benchmark `--dataset` (glyphs, 300
images a class; glyphs-small, 20 a class): the same `mtl_dls`
batches (5-way tasks of `--shots` support + `--queries` query images a class, `--tasks` tasks a batch, `--epoch_length`
tasks an epoch, Lee19 augmentation), a ResNet-12 `--channels` wide initialised from the same seed, RAdam at `--lr`
with `train`'s default plateau schedule on `episodic_acc`, stopped once the largest of the `--budget` seconds of
training (validation included) have passed, counted on `--clock`: `cpu` (the default) is the child's CPU time, which
on its one thread is its wall time on a quiet machine and stays fair when other work shares the cores; `wall` is for
a GPU. The batch running then ends its epoch's training, the epoch is validated,
and the fit stops. A smaller budget is scored from the same run, on the best of the epochs begun within it (the
schedule does not depend on the budget, so this is the run that budget alone would have made, but for its last epoch,
which it would have cut short).
Validation after every epoch: `--val_episodes` fixed 5-way 5-shot episodes scored by the logistic-regression probe on
the L2-normalised features (`episodic_acc` ± 95% CI); the best epoch's weights are kept. Test, from those weights: the
same `--test_episodes` 5-way 1- and 5-shot episodes (15 queries a class) for every algorithm, by the same probe; for the
meta-learners also by the algorithm's own head (`test_method='native'`) on the first `--native_episodes` of them.
Columns: the budget, best validation accuracy ± CI, test accuracy ± CI, training time on the clock, when each algorithm first reached the
lowest of the algorithms' best validation accuracies ("time to common accuracy"), epochs, peak memory (the child's
largest resident set on the CPU, `torch.cuda.max_memory_allocated` on CUDA). MAML and ANIL take learn2learn's example
options `--adaptation_steps` (1) and `--adaptation_lr` (0.5), first-order with `--first_order`. `--plot` saves the
validation accuracy of each algorithm against its training time.
Run: `python bench/bridge.py [--budget 120,600] [--dataset glyphs] [--channels 16,32,32,64] [--test_episodes 2000]
[--out table.md] [--plot bridge.png] [--save results.json]`; `--load a.json,b.json` makes one table and plot of runs
saved by `--save` (e.g. two sets of algorithms run side by side on the CPU clock).
"""
import argparse
import copy
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from fastai.callback.core import Callback, CancelFitException, CancelTrainException
from fastai.torch_core import set_seed

from fsmtl.algorithms import ALGORITHMS
from fsmtl.data.block import mtl_dls
from fsmtl.evaluate import evaluate
from fsmtl.learner import meta_learner, plateau_cbs
from fsmtl.runlog import quiet

HAS_QPTH = importlib.util.find_spec('qpth') is not None and importlib.util.find_spec('cvxpy') is not None
CLOCKS = dict(cpu=time.process_time, wall=time.perf_counter)
ALGOS = ['mtl', 'pretrain', 'protonet', 'r2d2'] + (['metaoptnet'] if HAS_QPTH else []) + ['anil', 'maml']


class Budget(Callback):
    "Stop training once the largest of `seconds` has passed (the running epoch is still validated); keep the best weights of each."
    order = 60   # after the Recorder has written the epoch's metrics

    def __init__(self,
                 seconds,   # a budget in seconds, or a list of them
                 clock=time.perf_counter):   # what counts them: wall time, or `time.process_time` for CPU time
        self.budgets, self.clock = sorted(seconds) if isinstance(seconds, (list, tuple)) else [seconds], clock
        self.seconds, self.log, self.began = self.budgets[-1], [], []
        self.best, self.states = {b: -1. for b in self.budgets}, {b: None for b in self.budgets}

    @property
    def state(self): return self.states[self.seconds]   # the best weights within the largest budget
    def before_fit(self): self.start = self.clock()
    def before_epoch(self): self.began.append(self.clock() - self.start)

    def after_batch(self):
        if self.training and self.clock() - self.start > self.seconds: raise CancelTrainException

    def within(self, b):  # one of the budgets
        "The log of the epochs begun within `b` seconds."
        return [e for e, t in zip(self.log, self.began) if t < b]

    def after_epoch(self):
        # read from EpisodicEval itself: the Recorder leaves out the train loss of an epoch cancelled before its first batch
        value = self.learn.episodic_eval.value
        self.log.append((self.clock() - self.start, value['episodic_acc'], value['episodic_ci']))
        better = [b for b in self.budgets if self.began[-1] < b and value['episodic_acc'] > self.best[b]]
        state = copy.deepcopy(self.learn.model.state_dict()) if better else None
        for b in better: self.best[b], self.states[b] = value['episodic_acc'], state
        if self.log[-1][0] > self.seconds: raise CancelFitException


def one(args):
    "Train and test one algorithm; print its results as one JSON line."
    torch.set_num_threads(args.threads)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    set_seed(args.seed)
    dls = mtl_dls(args.dataset, root=args.root, train_shots=args.shots, train_queries=args.queries, meta_batch_size=args.tasks,
                  epoch_length=args.epoch_length, test_shots=5, val_episodes=args.val_episodes,
                  test_episodes=args.test_episodes, seed=args.seed, device=device)
    learn = meta_learner(dls, args.one, arch_kwargs=dict(channels=tuple(int(c) for c in args.channels.split(','))),
                         lr=args.lr, adaptation_steps=args.adaptation_steps, adaptation_lr=args.adaptation_lr,
                         first_order=args.first_order)
    quiet(learn)   # no bars or epoch table: the output is one JSON line
    budget = Budget(budgets(args), CLOCKS[args.clock])
    learn.fit(10_000, args.lr, cbs=[budget, *plateau_cbs()])
    out = dict(algorithm=args.one, log=budget.log, scores={})
    for b, state in budget.states.items():
        learn.model.load_state_dict(state)
        test = evaluate(learn.model, dls, 'test', shots=(1, 5), progress=False)   # dls[2]: the same test episodes for all
        log = budget.within(b)
        score = out['scores'][b] = dict(test={s: (r.mean, r.ci95) for s, r in test.items()}, best=max(log, key=lambda e: e[1]),
                                        epochs=len(log), wall=log[-1][0])
        if ALGORITHMS[args.one].native and args.native_episodes:
            # the first `native_episodes` of those episodes, drawn again
            nat = evaluate(learn.model, dls, 'test', shots=(1, 5), episodes=args.native_episodes, probe='native', progress=False)
            score['native'] = {s: (r.mean, r.ci95) for s, r in nat.items()}
    out['peak_mib'] = (torch.cuda.max_memory_allocated() / 2 ** 20 if device == 'cuda'
                       else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print('RESULT ' + json.dumps(out))


def pct(m, ci): return f"{100 * m:.1f} ± {100 * ci:.1f}"


def table(results, clock='cpu') -> str:
    "The markdown table of the children's results, one row per algorithm and budget."
    done = [r for r in results if 'error' not in r]
    target = min(max(a for _, a, _ in r['log']) for r in done) if done else float('nan')
    rows = ['| algorithm | budget s | best val acc (5-shot) | test 1-shot | test 5-shot | native 1-shot | native 5-shot '
            f'| training s ({clock}) | s to {100 * target:.1f}% val | epochs | peak MiB |', '|' + '---|' * 11]
    for r in results:
        if 'error' in r:
            rows.append(f"| {r['algorithm']} | failed: {r['error'][:200]} |" + ' |' * 9)
            continue
        reach = next(t for t, a, _ in r['log'] if a >= target)
        for b, sc in r['scores'].items():
            nat = sc.get('native', {})
            rows.append(f"| {r['algorithm']} | {float(b):.0f} | {pct(*sc['best'][1:])} | {pct(*sc['test']['1'])} "
                        f"| {pct(*sc['test']['5'])} | {pct(*nat['1']) if nat else '-'} | {pct(*nat['5']) if nat else '-'} "
                        f"| {sc['wall']:.0f} | {reach:.0f} | {sc['epochs']} | {r['peak_mib']:.0f} |")
    return '\n'.join(rows)


def plot(results, path, clock='cpu'):
    "Each algorithm's validation accuracy against its training time, saved to `path`."
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        if 'error' in r: continue
        t, a, ci = zip(*r['log'])
        ax.errorbar(t, [100 * v for v in a], yerr=[100 * c for c in ci], marker='o', ms=3, capsize=2, label=r['algorithm'])
    ax.set(xlabel=f'training seconds on the {clock} clock (validation included)', ylabel='validation accuracy, 5-way 5-shot (%)',
           title='accuracy against training time')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def budgets(args): return [float(b) for b in str(args.budget).split(',')]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--algorithms', default=','.join(ALGOS))
    p.add_argument('--budget', default='120', help='training seconds of each algorithm; several, comma-separated, from one run')
    p.add_argument('--clock', default='cpu', choices=list(CLOCKS),
                   help="what counts the budget: the child's CPU time (cpu), or wall time (wall, for a GPU)")
    p.add_argument('--dataset', default='glyphs', help='glyphs (300 images a class) or glyphs-small (20 a class)')
    p.add_argument('--channels', default='16,32,32,64')
    p.add_argument('--shots', type=int, default=5)
    p.add_argument('--queries', type=int, default=5)
    p.add_argument('--tasks', type=int, default=6)
    p.add_argument('--epoch_length', type=int, default=96)
    p.add_argument('--val_episodes', type=int, default=50)
    p.add_argument('--test_episodes', type=int, default=2000)
    p.add_argument('--native_episodes', type=int, default=200)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--adaptation_steps', type=int, default=1)
    p.add_argument('--adaptation_lr', type=float, default=0.5)
    p.add_argument('--first_order', action='store_true')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=1, help='torch threads of each child')
    p.add_argument('--root', default='~/data')
    p.add_argument('--out', default=None, help='also write the table to this file')
    p.add_argument('--plot', default=None, help='save the plot of validation accuracy against training time to this file')
    p.add_argument('--save', default=None, help="also write the children's results (logs and scores) to this JSON file")
    p.add_argument('--load', default=None, help='no training: the table (and --plot) of the results that --save wrote, '
                                                'comma-separated files of runs made side by side')
    p.add_argument('--one', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one: return one(args)
    results = [] if args.load is None else [r for f in args.load.split(',') for r in json.loads(Path(f).read_text())]
    for alg in args.algorithms.split(',') if args.load is None else []:
        argv_child = [a for a in (argv if argv is not None else sys.argv[1:])] + ['--one', alg]
        done = subprocess.run([sys.executable, __file__, *argv_child], capture_output=True, text=True)
        line = next((l for l in done.stdout.splitlines() if l.startswith('RESULT ')), None)
        if line is None:   # a diverging meta-learner is a result too: its row says why it stopped
            err = (done.stderr.strip().splitlines() or ['no output'])[-1]
            results.append(dict(algorithm=alg, error=err))
            print(f"{alg} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(line[len('RESULT '):]))
        print(f"{alg}: {len(results[-1]['log'])} epochs in {results[-1]['log'][-1][0]:.0f} s", file=sys.stderr, flush=True)
    out = table(results, args.clock)
    print(out)
    if args.out:
        with open(args.out, 'w') as f: f.write(out + '\n')
    if args.plot: plot(results, args.plot, args.clock)
    if args.save: Path(args.save).write_text(json.dumps(results))


if __name__ == '__main__':
    main()
