"""Episodes a second: fsmtl's batched `LogisticProbe` against a loop of scikit-learn's `LogisticRegression`, on the same features.

Real features: the glyph benchmark's validation images (87 classes) through a 640-feature resnet10t that was first
trained for `--train-steps` steps (150 by default, cross-entropy over the 250 base classes, about a minute on 2 CPU
cores) so that the features are a trained backbone's, as in a real evaluation; `--train-steps 0` keeps the
untrained backbone, whose nearly collinear features make scikit-learn's L-BFGS stop short of the optimum at its
default tolerance. Episodes: the indices of `episode_dl(splits, 'val', 5, 5, 15, n, seed=0)`, class-major (per class
5 supports, then 15 queries). 5-shot uses all supports, 1-shot the first of each class. The `LogisticProbe` (fit +
predict of all episodes at once, on `--device`) counts its best of 3 runs; the `SklearnProbe` loop (CPU, one
episode at a time) runs once, with one BLAS thread by default: its problems (25 x 640) are too small for more, and
on a busy 2-core machine two threads made each fit 7x slower. Both are then compared query by query.
`--save-features F` writes the features and episodes, and `--features F` reads them instead of rendering and
training (for a machine without fastai).
Run: `python bench/probe.py [--episodes N] [--device cpu|cuda] [--root DIR] [--dataset NAME] [--train-steps N] [--sklearn-threads N]`.
"""
import argparse
import os
import tempfile
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from _common import sync
from fsmtl.features import extract_features
from fsmtl.probe import LogisticProbe, SklearnProbe

WAYS, SHOTS, QUERIES = 5, 5, 15


def features(splits, device, steps):
    "L2-normalised 640-d features of every validation image, from a fixed-seed resnet10t trained `steps` steps on the base classes."
    torch.manual_seed(0)
    model = timm.create_model('resnet10t', num_classes=0, channels=(64, 160, 320, 640)).to(device)
    mean, std = (torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1) for v in (splits.mean, splits.std))
    norm = lambda a: (torch.from_numpy(a).to(device).permute(0, 3, 1, 2).float() / 255 - mean) / std
    head = torch.nn.Linear(model.num_features, splits.train.n_classes).to(device)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], 1e-3)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        idx = rng.integers(0, len(splits.train), 128)
        loss = F.cross_entropy(head(model(norm(splits.train.items[idx]))), torch.from_numpy(splits.train.labels[idx]).to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return extract_features(model, norm(splits.val.items)).cpu()


def episode_features(args):
    "Features (episodes, ways, shots + queries, D) and a description, from `--features` or made from the glyphs."
    if args.features:
        saved = torch.load(args.features, weights_only=True)
        feats, episodes, what = saved['feats'], saved['episodes'][:args.episodes], saved['what']
        return feats[episodes].view(len(episodes), WAYS, SHOTS + QUERIES, -1), what
    from fsmtl.data.benchmarks import get_benchmark
    from fsmtl.data.block import episode_dl
    splits = get_benchmark(args.dataset, root=args.root, progress=False)
    feats = features(splits, args.device, args.train_steps)
    episodes = episode_dl(splits, 'val', WAYS, SHOTS, QUERIES, n=args.episodes, seed=0, device='cpu').episodes
    what = (f"{feats.shape[-1]}-d features of {len(splits.val)} glyph images ({splits.val.n_classes} classes), "
            f"resnet10t trained {args.train_steps} steps")
    episodes = torch.from_numpy(episodes)
    if args.save_features: torch.save(dict(feats=feats, episodes=episodes, what=what), args.save_features)
    return feats[episodes].view(len(episodes), WAYS, SHOTS + QUERIES, -1), what


def timed(fn, device, runs=1):
    "The output of `fn()` and its best time over `runs` runs, in seconds."
    best = float('inf')
    for _ in range(runs):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return out, best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--episodes', type=int, default=2000, help='5-way episodes of 15 queries a class')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help="the LogisticProbe's device")
    p.add_argument('--root', default=os.path.join(tempfile.gettempdir(), 'fsmtl-bench'), help='where the glyphs are rendered')
    p.add_argument('--dataset', default='glyphs', help="the benchmark whose validation images give the features ('glyphs-small' for a quick run)")
    p.add_argument('--sklearn-threads', type=int, default=1, help="BLAS threads of the sklearn loop; 0: numpy's default")
    p.add_argument('--train-steps', type=int, default=150, help='training steps of the backbone before its features are taken')
    p.add_argument('--save-features', help='write the episodes\' features here')
    p.add_argument('--features', help='read the episodes\' features from here instead of making them')
    args = p.parse_args()
    dev = args.device

    t = time.perf_counter()
    f, what = episode_features(args)
    print(f"{len(f)} episodes of {what}, ready in {time.perf_counter() - t:.1f} s; LogisticProbe on {dev} "
          f"({torch.cuda.get_device_name(dev) if torch.device(dev).type == 'cuda' else 'CPU'}), "
          f"torch threads {torch.get_num_threads()}, sklearn BLAS threads {args.sklearn_threads or 'default'}, cpus {os.cpu_count()}")

    q = f[:, :, SHOTS:].flatten(1, 2)
    yq = torch.arange(WAYS).repeat_interleave(QUERIES)
    ratios = {}
    for shots in (SHOTS, 1):
        s = f[:, :, :shots].flatten(1, 2)
        y = torch.arange(WAYS).repeat_interleave(shots).expand(len(f), -1)
        s_dev, y_dev, q_dev = s.to(dev), y.to(dev), q.to(dev)
        ours, t_ours = timed(lambda: LogisticProbe(C=3.).fit(s_dev, y_dev).predict(q_dev), dev, runs=3)
        with threadpool_limits(args.sklearn_threads or None):
            ref, t_ref = timed(lambda: SklearnProbe(C=3.).fit(s, y).predict(q), 'cpu')
        ours = ours.cpu()
        agree = (ours == ref).float().mean().item()
        acc_ours, acc_ref = (100 * (pred == yq).float().mean().item() for pred in (ours, ref))
        ratios[shots] = t_ref / t_ours
        print(f"{shots}-shot: LogisticProbe {t_ours:6.2f} s ({len(f) / t_ours:7.0f} ep/s)   sklearn loop {t_ref:6.2f} s "
              f"({len(f) / t_ref:5.0f} ep/s)   ratio {t_ref / t_ours:6.1f}")
        print(f"        agreement {100 * agree:.3f}% of {ours.numel()} queries   accuracy {acc_ours:.3f}% vs sklearn "
              f"{acc_ref:.3f}%   difference {acc_ours - acc_ref:+.3f} points")
    print(f"ratio: {ratios[SHOTS]:.1f}")


if __name__ == '__main__':
    main()
