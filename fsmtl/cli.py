"The `fsmtl` command."
from __future__ import annotations
import argparse
import sys

__all__ = ['main']


def _flag(p, name, **kwargs):
    "Add `--name` with underscores, as the original code spells its flags, and with hyphens."
    names = [f'--{name}'] + ([f"--{name.replace('_', '-')}"] if '_' in name else [])
    p.add_argument(*names, **kwargs)


def _data(args):
    "Download (when needed), check and summarise a benchmark; optionally save a picture of a training batch."
    from .data.benchmarks import get_benchmark
    from .data.core import SPLITS
    splits = get_benchmark(args.dataset, root=args.root, download=not args.no_download)
    print(f"{splits.name}: {splits.size}x{splits.size} images")
    for s in SPLITS:
        counts = splits[s].counts()
        print(f"  {s:5s} {splits[s].n_classes:4d} classes  {len(splits[s]):7d} images  "
              f"({counts.min()}-{counts.max()} a class)")
    if args.show:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        from .data.block import mtl_dls
        # the smallest tasks that show two images a class, so that small folders can be looked at too
        ways = lambda *ss: min(5, *(splits[s].n_classes for s in ss))
        dls = mtl_dls(splits, train_ways=ways('train'), train_shots=1, train_queries=1, meta_batch_size=4, epoch_length=4,
                      test_ways=ways('val', 'test'), test_shots=1, test_queries=1, val_episodes=1, test_episodes=1,
                      augment=False, device='cpu')
        dls.train.show_batch(max_n=4, per_class=2)
        plt.savefig(args.show, bbox_inches='tight')
        print(f"a training batch, tasks as rows: {args.show}")


def main(argv=None):
    "Entry point of the `fsmtl` command."
    p = argparse.ArgumentParser(prog='fsmtl', description='Multi-task learning for few-shot image classification.')
    sub = p.add_subparsers(dest='command', required=True, metavar='COMMAND')
    d = sub.add_parser('data', help='download, check and summarise a benchmark',
                       description='Download (when needed), check and summarise a few-shot benchmark.')
    _flag(d, 'dataset', default='glyphs',
          help='glyphs (embedded, the default), cifarfs, fc100, mini-imagenet, tiered-imagenet, or folder')
    _flag(d, 'root', default='~/data', help='folder of the data folders; for folder, your folder of images')
    _flag(d, 'no_download', action='store_true', help='fail, naming the missing files, instead of downloading them')
    _flag(d, 'show', metavar='PNG', help='save a picture of a training batch here')
    d.set_defaults(run=_data)
    args = p.parse_args(argv)
    try: args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"fsmtl {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
