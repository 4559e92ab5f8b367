"""MTL against meta-learning on the same data, backbone, schedule and wall-time budget: one table.

Each algorithm (`--algorithms`; default mtl, protonet, r2d2, anil, maml, and metaoptnet when qpth is installed) trains
in its own child process, so that its peak memory is its own, on the embedded glyphs benchmark: the same `mtl_dls`
batches (5-way tasks of `--shots` support + `--queries` query images a class, `--tasks` tasks a batch, `--epoch_length`
tasks an epoch, Lee19 augmentation), a ResNet-12 `--channels` wide initialised from the same seed, RAdam at `--lr`
with `train`'s default plateau schedule on `episodic_acc`, stopped once `--budget` seconds of training (validation
included) have passed: the batch running then ends its epoch's training, the epoch is validated, and the fit stops.
Validation after every epoch: `--val_episodes` fixed 5-way 5-shot episodes scored by the logistic-regression probe on
the L2-normalised features (`episodic_acc` ± 95% CI); the best epoch's weights are kept. Test, from those weights: the
same `--test_episodes` 5-way 1- and 5-shot episodes (15 queries a class) for every algorithm, by the same probe; for the
meta-learners also by the algorithm's own head (`test_method='native'`) on the first `--native_episodes` of them.
Columns: best validation accuracy ± CI, test accuracy ± CI, training wall time, when each algorithm first reached the
lowest of the algorithms' best validation accuracies ("time to common accuracy"), epochs, peak memory (the child's
largest resident set on the CPU, `torch.cuda.max_memory_allocated` on CUDA). MAML and ANIL take learn2learn's example
options `--adaptation_steps` (1) and `--adaptation_lr` (0.5), first-order with `--first_order`.
Run: `python bench/bridge.py [--budget S] [--channels 16,32,32,64] [--test_episodes 2000] [--out table.md]`.
"""
import argparse
import copy
import importlib.util
import json
import resource
import subprocess
import sys
import time

import torch
from fastai.callback.core import Callback, CancelFitException, CancelTrainException
from fastai.torch_core import set_seed

from fsmtl.algorithms import meta_learner, native_evaluate
from fsmtl.data.block import mtl_dls
from fsmtl.evaluate import evaluate
from fsmtl.learner import plateau_cbs
from fsmtl.runlog import quiet

HAS_QPTH = importlib.util.find_spec('qpth') is not None and importlib.util.find_spec('cvxpy') is not None
ALGOS = ['mtl', 'protonet', 'r2d2'] + (['metaoptnet'] if HAS_QPTH else []) + ['anil', 'maml']


class Budget(Callback):
    "Stop training once `seconds` have passed (the running epoch is still validated); keep the best epoch's weights."
    order = 60   # after the Recorder has written the epoch's metrics

    def __init__(self, seconds): self.seconds, self.log, self.best, self.state = seconds, [], -1., None
    def before_fit(self): self.start = time.perf_counter()

    def after_batch(self):
        if self.training and time.perf_counter() - self.start > self.seconds: raise CancelTrainException

    def after_epoch(self):
        # read from EpisodicEval itself: the Recorder leaves out the train loss of an epoch cancelled before its first batch
        value = self.learn.episodic_eval.value
        self.log.append((time.perf_counter() - self.start, value['episodic_acc'], value['episodic_ci']))
        if value['episodic_acc'] > self.best:
            self.best, self.state = value['episodic_acc'], copy.deepcopy(self.learn.model.state_dict())
        if self.log[-1][0] > self.seconds: raise CancelFitException


def one(args):
    "Train and test one algorithm; print its results as one JSON line."
    torch.set_num_threads(args.threads)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    set_seed(args.seed)
    dls = mtl_dls('glyphs', root=args.root, train_shots=args.shots, train_queries=args.queries, meta_batch_size=args.tasks,
                  epoch_length=args.epoch_length, test_shots=5, val_episodes=args.val_episodes,
                  test_episodes=args.test_episodes, seed=args.seed, device=device)
    learn = meta_learner(dls, args.one, arch_kwargs=dict(channels=tuple(int(c) for c in args.channels.split(','))),
                         lr=args.lr, adaptation_steps=args.adaptation_steps, adaptation_lr=args.adaptation_lr,
                         first_order=args.first_order)
    quiet(learn)   # no bars or epoch table: the output is one JSON line
    budget = Budget(args.budget)
    learn.fit(10_000, args.lr, cbs=[budget, *plateau_cbs()])
    learn.model.load_state_dict(budget.state)
    test = evaluate(learn.model, dls, 'test', shots=(1, 5), progress=False)   # dls[2]: the same test episodes for all
    out = dict(algorithm=args.one, log=budget.log, test={s: (r.mean, r.ci95) for s, r in test.items()},
               epochs=len(budget.log), wall=budget.log[-1][0])
    if args.one != 'mtl' and args.native_episodes:
        # the first `native_episodes` of those episodes, drawn again
        nat = native_evaluate(learn.model, dls, 'test', shots=(1, 5), episodes=args.native_episodes, progress=False)
        out['native'] = {s: (r.mean, r.ci95) for s, r in nat.items()}
    out['peak_mib'] = (torch.cuda.max_memory_allocated() / 2 ** 20 if device == 'cuda'
                       else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print('RESULT ' + json.dumps(out))


def pct(m, ci): return f"{100 * m:.1f} ± {100 * ci:.1f}"


def table(results) -> str:
    "The markdown table of the children's results."
    done = [r for r in results if 'error' not in r]
    target = min(max(a for _, a, _ in r['log']) for r in done) if done else float('nan')
    rows = ['| algorithm | best val acc (5-shot) | test 1-shot | test 5-shot | native 1-shot | native 5-shot | training s '
            f'| s to {100 * target:.1f}% val | epochs | peak MiB |', '|' + '---|' * 10]
    for r in results:
        if 'error' in r:
            rows.append(f"| {r['algorithm']} | failed: {r['error'][:200]} |" + ' |' * 8)
            continue
        best = max(r['log'], key=lambda e: e[1])
        reach = next(t for t, a, _ in r['log'] if a >= target)
        nat = r.get('native', {})
        rows.append(f"| {r['algorithm']} | {pct(best[1], best[2])} | {pct(*r['test']['1'])} | {pct(*r['test']['5'])} "
                    f"| {pct(*nat['1']) if nat else '-'} | {pct(*nat['5']) if nat else '-'} | {r['wall']:.0f} | {reach:.0f} "
                    f"| {r['epochs']} | {r['peak_mib']:.0f} |")
    return '\n'.join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--algorithms', default=','.join(ALGOS))
    p.add_argument('--budget', type=float, default=120., help='training seconds of each algorithm')
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
    p.add_argument('--one', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one: return one(args)
    results = []
    for alg in args.algorithms.split(','):
        argv_child = [a for a in (argv if argv is not None else sys.argv[1:])] + ['--one', alg]
        done = subprocess.run([sys.executable, __file__, *argv_child], capture_output=True, text=True)
        line = next((l for l in done.stdout.splitlines() if l.startswith('RESULT ')), None)
        if line is None:   # a diverging meta-learner is a result too: its row says why it stopped
            err = (done.stderr.strip().splitlines() or ['no output'])[-1]
            results.append(dict(algorithm=alg, error=err))
            print(f"{alg} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(line[len('RESULT '):]))
        print(f"{alg}: {results[-1]['epochs']} epochs in {results[-1]['wall']:.0f} s", file=sys.stderr)
    out = table(results)
    print(out)
    if args.out:
        with open(args.out, 'w') as f: f.write(out + '\n')


if __name__ == '__main__':
    main()
