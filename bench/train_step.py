"""Training batches per second: fastai's `learn.fit` of an `mtl_learner` against a hand-written PyTorch loop (goal: ratio >= 0.95).

Both train one ResNet-12 (`--channels` wide), reset before every run to the same initial weights and random state, each
run with a fresh fastai RAdam (`get_opt('radam')`, lr 1e-3, as `mtl_learner` builds it), over one fixed list of
`--batches` batches drawn once from `mtl_dls(...).train` on the CPU: random uint8 `--size`-pixel images of 64 base
classes held in memory, 5-way tasks of 5 + 5 images, `--tasks` tasks a batch, Lee19-augmented and normalised.
fastai gets the batches as the loader yields them (`TensorImage`, `TensorCategory`; its `CastToTensor` makes them plain
tensors each batch), the hand loop as plain tensors over the same memory. The hand loop: `model.train()`, then per
batch `loss = MultiTaskLoss(...)(model(x), y)`, `loss.backward()`, `opt.step()`, `opt.zero_grad()`. fastai: `learn.fit(1)`
with the callbacks users run (TrainEvalCallback, Recorder and its smooth loss, CastToTensor, fsmtl's TaskAccuracy and
StopOnNaN), less two: `EpisodicEval`, so that only the training loop is compared (the Learner's train loader is the
list of batches and its validation loader an empty list: neither fastai's DataLoader nor sampling and augmentation,
timed by bench/loader.py, are in either time), and the progress bar, unless `--progress` (it then prints to stdout);
the epoch table is not printed (`learn.no_logging()`). A fastai run is timed over its whole `fit` call, epoch start and
end included; a hand run over its optimiser's creation and its loop. After one untimed one-batch run of each, the two
alternate over `--rounds` rounds (which goes first alternates too), and each one's best round counts.
`--check` first trains both on the first 3 batches and prints the largest difference of their final weights.
Run: `python bench/train_step.py [--channels 64,160,320,640] [--batches N] [--rounds N] [--size PX] [--device cpu|cuda] [--check]`.
"""
import argparse
import copy
import time

import torch
from fastai.data.core import DataLoaders
from fastai.torch_core import to_device

from _common import sync, synthetic_splits
from fsmtl.data.block import mtl_dls
from fsmtl.heads import MultiTaskLoss
from fsmtl.learner import get_opt, mtl_learner
from fsmtl.runlog import quiet

WAYS, SHOTS, QUERIES, N_BASE, LR, SEED = 5, 5, 5, 64, 1e-3, 0


class CachedBatches(list):
    "Batches that a fastai `Learner` iterates as its train or validation loader, moved by `to` as fastai's loaders are."
    device = None

    def to(self, device):
        self[:] = [to_device(b, device) for b in self]
        self.device = device
        return self


class Bench:
    "One model trained by fastai's `fit` or by the hand loop, each run from the same initial weights and random state."
    def __init__(self, args):
        dls = mtl_dls(synthetic_splits(args.size, N_BASE, 20, novel_per_class=20), train_ways=WAYS, train_shots=SHOTS, train_queries=QUERIES,
                      meta_batch_size=args.tasks, epoch_length=args.tasks * max(args.batches, 3), val_episodes=1,
                      test_episodes=1, device='cpu')
        self.batches = list(dls.train)   # drawn once, on the CPU, then moved to the device
        torch.manual_seed(SEED)
        self.learn = mtl_learner(dls, arch='resnet12', lr=LR, arch_kwargs=dict(channels=args.channels))
        self.learn.remove_cb(self.learn.episodic_eval)
        if not args.progress: quiet(self.learn)
        self.device, self.model = args.device, self.learn.model.to(args.device)
        self.init = copy.deepcopy(self.model.state_dict())
        self.loss_func, self.opt_func = MultiTaskLoss(WAYS, SHOTS + QUERIES), get_opt('radam')

    def reset(self):
        "The initial weights, and the random state that dropout draws from."
        self.model.load_state_dict(self.init)
        torch.manual_seed(SEED)

    def fastai(self, batches):
        "fastai's loop over `batches`, which `run` made the Learner's train loader."
        with self.learn.no_logging(): self.learn.fit(1, LR, reset_opt=True)

    def hand(self, batches):
        "The hand-written loop over `batches`, with a fresh optimiser."
        model, loss_func = self.model, self.loss_func
        opt = self.opt_func(list(model.parameters()), lr=LR)
        model.train()
        for xb, yb in batches:
            loss = loss_func(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()

    def run(self, loop, batches):
        "One run of `loop` ('fastai' or 'hand') over `batches` on the device, from the initial weights; its time in seconds."
        batches = [to_device(b, self.device) for b in batches]
        if loop == 'fastai': self.learn.dls = DataLoaders(CachedBatches(batches), CachedBatches(), device=self.device)
        else: batches = [tuple(t.as_subclass(torch.Tensor) for t in b) for b in batches]
        self.reset()
        sync(self.device)
        t = time.perf_counter()
        getattr(self, loop)(batches)
        sync(self.device)
        return time.perf_counter() - t

    def state(self):
        "A copy of the model's floating-point weights and buffers, on the CPU."
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items() if v.is_floating_point()}

    def check(self, n=3):
        "The largest absolute difference of weights and buffers after `n` batches of each loop, and the largest change of a weight."
        start = {k: v.cpu() for k, v in self.init.items()}
        self.run('fastai', self.batches[:n])
        after_fastai = self.state()
        self.run('hand', self.batches[:n])
        after_hand = self.state()
        diff = max((after_fastai[k] - v).abs().max().item() for k, v in after_hand.items())
        moved = max((after_hand[k] - start[k]).abs().max().item() for k, _ in self.model.named_parameters())
        return diff, moved


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--channels', default='64,160,320,640', help="ResNet-12's stage widths, comma-separated")
    p.add_argument('--batches', type=int, default=3, help='timed batches of each loop in a round')
    p.add_argument('--rounds', type=int, default=3, help='rounds; the best of each loop counts')
    p.add_argument('--tasks', type=int, default=2, help='5-way tasks of 5 + 5 images in a batch (meta_batch_size)')
    p.add_argument('--size', type=int, default=32, help='image side in pixels')
    p.add_argument('--device', default='cpu', help='where the model trains: cpu or cuda')
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    p.add_argument('--progress', action='store_true', help="keep fastai's progress bar")
    p.add_argument('--check', action='store_true', help='first compare the weights after 3 batches of each loop')
    args = p.parse_args()
    args.channels = tuple(int(c) for c in args.channels.split(','))
    if args.size < 16: p.error(f"--size must be at least 16: ResNet-12 halves the image 4 times, got {args.size}")
    if min(args.batches, args.rounds, args.tasks) < 1: p.error("--batches, --rounds and --tasks must be at least 1")
    if torch.device(args.device).type == 'cuda' and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA GPU here")
    torch.set_num_threads(args.threads)
    b = Bench(args)
    print(f"ResNet-12 {args.channels}, {args.size}px, batches of {len(b.batches[0][1])} images ({args.tasks} tasks), "
          f"{args.batches} batches a round, {args.rounds} rounds, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, progress bar {'on' if args.progress else 'off'}")
    if args.check:
        diff, moved = b.check()
        print(f"check: max abs weight difference fastai vs hand after 3 batches {diff:.3g} "
              f"(weights moved up to {moved:.3g} from the start)")
    loops = ['fastai', 'hand']
    batches = b.batches[:args.batches]
    for loop in loops: b.run(loop, batches[:1])   # warm-up
    rates = {loop: [] for loop in loops}
    for r in range(args.rounds):
        for loop in loops[::1 if r % 2 == 0 else -1]: rates[loop].append(len(batches) / b.run(loop, batches))
    fastai, hand = max(rates['fastai']), max(rates['hand'])
    for loop in loops: print(f"{loop:6s} rounds: " + ' '.join(f"{v:.5g}" for v in rates[loop]) + " batches/s")
    print(f"fastai learn.fit {fastai:.5g} batches/s   hand loop {hand:.5g} batches/s   "
          f"fastai's extra time {1e3 * (1 / fastai - 1 / hand):+.2f} ms a batch ({1e3 / hand:.1f} ms a batch by hand)")
    print(f"ratio: {fastai / hand:.3f}")


if __name__ == '__main__':
    main()
