"""One epoch of the mini-ImageNet 5-shot recipe's shape, timed, and from it the full recipe's wall time beside the paper's 3.7 V100-hours.

The recipe is the first of `fsmtl.train.RECIPES` (`--norm_train_features --meta_batch_size 2 --test_shots 5`, every
other option at its default: 1600 tasks an epoch of 5-way 5 + 5 images, so 800 steps of 50 images; 400 validation
episodes of 5-way 5 + 15 images scored by the logistic probe; RAdam at 1e-3; the full-width ResNet-12), built as
`fsmtl train` builds it, on random uint8 84-pixel images of 64 base classes (`--per-class` each, 600 as in
mini-ImageNet) held in memory. One epoch runs through the recipe's own fit (the plateau schedule), its training and its
validation timed apart between device syncs; the first steps' start-up costs are inside, as in a real first epoch.
The full recipe stops when `episodic_acc` has not improved for 15 epochs, after 200 at most; how many epochs that takes
depends on the real images, so the estimate is given at 200 epochs (an upper bound) and as the epochs that the paper's
3.7 hours buy here. The final test (2000 episodes, 1- and 5-shot) is scaled from validation's cost an episode.
The comparison is with the paper's reported figure on a V100, not a measurement side by side.
Run: `python bench/recipe_epoch.py [--device cuda|cpu]`; `--device cpu` runs a smoke setting that checks the script.
"""
import argparse
import time

import torch
from fastai.callback.core import Callback

from _common import bench_device, sync, synthetic_splits
from fsmtl.config import options, run_config
from fsmtl.train import RECIPES, _fit, _learner

PAPER_HOURS, TEST_EPISODES, MAX_EPOCHS = 3.7, options()['test_episodes'][0], options()['max_epochs'][0]
RECIPE = next(r for r in RECIPES if r['dataset'] == 'mini-imagenet' and r['shots'] == 5)
GPU_DEFAULTS = dict(size=84, per_class=600, channels=None, epoch_length=None, val_epoch_length=None)
CPU_SMOKE = dict(size=16, per_class=20, channels='4,8,8,16', epoch_length=4, val_epoch_length=2)


class PhaseClock(Callback):
    "Seconds of the epoch's training and of its validation, each between device syncs."
    order = 100   # after every other callback's `before_*`

    def before_train(self): self.t = self._now()
    def after_train(self): self.train_s = self._now() - self.t
    def before_validate(self): self.t = self._now()
    def after_validate(self): self.valid_s = self._now() - self.t

    def _now(self):
        sync(self.dls.device)
        return time.perf_counter()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', help='cuda (default when there is one) or cpu (a smoke run)')
    p.add_argument('--size', type=int, help='image side in pixels (GPU 84)')
    p.add_argument('--per-class', type=int, help='images of each of the 64 base classes (GPU 600)')
    p.add_argument('--channels', help="ResNet-12's stage widths, comma-separated (GPU: the recipe's, 64,160,320,640)")
    p.add_argument('--epoch-length', type=int, help="training tasks of the epoch (GPU: the recipe's)")
    p.add_argument('--val-epoch-length', type=int, help="validation episodes (GPU: the recipe's)")
    args = p.parse_args()
    device = bench_device(args, 'times an epoch', GPU_DEFAULTS, CPU_SMOKE)

    shape = {k: v for k, v in dict(epoch_length=args.epoch_length, val_episodes=args.val_epoch_length,
                                   arch_kwargs=args.channels and dict(channels=[int(c) for c in args.channels.split(',')])).items() if v}
    splits = synthetic_splits(args.size, 64, args.per_class, novel_per_class=20)
    cfg = run_config(dict(RECIPE['options'], dataset=splits, gpu=(device.index or 0) if device.type == 'cuda' else -1,
                          progress=False, max_epochs=1, **shape))
    data = cfg.data
    learn = _learner(cfg, device)
    learn.add_cb(PhaseClock())
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, torch threads {torch.get_num_threads()}'
    steps = len(learn.dls.train)
    images = steps * data.meta_batch_size * data.train_ways * (data.train_shots + data.train_queries)
    print(f"{name}; torch {torch.__version__}; the recipe `{' '.join(f'{k}={v}' for k, v in RECIPE['options'].items())}`, "
          f"{args.size}px, 64 base classes of {args.per_class} random images, ResNet-12 of {learn.model.backbone.num_features} "
          f"features, {steps} steps of {images // steps} images, {data.val_episodes} validation episodes")
    _fit(learn, cfg.fit, 0, [])
    train_s, valid_s = learn.phase_clock.train_s, learn.phase_clock.valid_s
    epoch = train_s + valid_s
    test = valid_s / data.val_episodes * TEST_EPISODES
    full = (MAX_EPOCHS * epoch + test) / 3600
    print(f"epoch: training {train_s:.1f} s ({images / train_s:.5g} img/s), validation {valid_s:.1f} s "
          f"({data.val_episodes / valid_s:.4g} episodes/s), {epoch:.1f} s in all")
    print(f"full recipe: at most {MAX_EPOCHS} epochs + a {TEST_EPISODES}-episode test ({test:.0f} s, "
          f"scaled from validation) = {full:.2f} h; the paper: {PAPER_HOURS} V100-hours, which buy "
          f"{PAPER_HOURS * 3600 / epoch:.0f} epochs here")
    if device.type != 'cuda': print("(a CPU smoke run of a tiny shape: the times say nothing about the recipe)")
    print(f"ratio: {full / PAPER_HOURS:.3f}")


if __name__ == '__main__':
    main()
