"The `fsmtl` command."
from __future__ import annotations
import argparse
import json
import sys

__all__ = ['main']


def _flag(p, name, *aliases, **kwargs):
    "Add `--name` and its `aliases` with underscores, as the original code spells its flags, and with hyphens."
    names = [f'--{n}' for a in (name, *aliases) for n in dict.fromkeys([a, a.replace('_', '-')])]
    p.add_argument(*names, **kwargs)


def _data(args):
    "Download (when needed), check and summarise a benchmark."
    from .data.benchmarks import get_benchmark
    from .data.core import SPLITS
    splits = get_benchmark(args.dataset, root=args.root, download=not args.no_download)
    print(f"{splits.name}: {splits.size}x{splits.size} images")
    for s in SPLITS:
        counts = splits[s].counts()
        print(f"  {s:5s} {splits[s].n_classes:4d} classes  {len(splits[s]):7d} images  "
              f"({counts.min()}-{counts.max()} a class)")
    if args.show:   # a picture of a training batch
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        from .data.block import mtl_dls
        # the smallest tasks that show two images per class, so that small folders can be looked at too
        ways = lambda *ss: min(5, *(splits[s].n_classes for s in ss))
        dls = mtl_dls(splits, train_ways=ways('train'), train_shots=1, train_queries=1, meta_batch_size=4, epoch_length=4,
                      test_ways=ways('val', 'test'), test_shots=1, final_shots=1, test_queries=1, val_episodes=1,
                      test_episodes=1, augment=False, device='cpu')
        dls.train.show_batch(max_n=4, per_class=2)
        plt.savefig(args.show, bbox_inches='tight')
        print(f"a training batch, tasks as rows: {args.show}")


def _predict(args):
    "Fit a classifier on the support's class folders; label each readable query."
    import csv
    from pathlib import Path
    from .classifier import FewShotClassifier
    from .data.images import check_images, class_dirs, class_images, image_files, unreadable_images
    support, query = Path(args.support).expanduser(), Path(args.query).expanduser()
    for d in (support, query):
        if not d.is_dir(): raise FileNotFoundError(f"No folder {d}")
    dirs = class_dirs(support)
    if len(dirs) < 2:
        raise ValueError(f"{support} has {len(dirs)} class folder(s): give one folder of example images per class, two at least")
    files = class_images(dirs)   # a class's examples are the images under its folder, as in a folder benchmark
    queries = image_files(query, recurse=False)
    if not queries: raise ValueError(f"{query} holds no images (judged by file extension): put the images to classify "
                                     "directly in it")
    clf = FewShotClassifier.from_checkpoint(args.checkpoint, probe=args.probe)
    check_images(sum(files, []), clf.input.size)   # every bad example named at once, since the probe needs them all
    bad = dict(unreadable_images(queries, clf.input.size))
    for q, why in bad.items(): print(f"fsmtl predict: skipped {q}: cannot read it ({why})", file=sys.stderr)
    if not (queries := [q for q in queries if q not in bad]):
        raise ValueError(f"none of the {len(bad)} images in {query} could be read (each is named above): replace them")
    clf.fit(sum(files, []), [d.name for d, f in zip(dirs, files) for _ in f])
    rows = [(q.name, label, f'{p:.4f}') for q, label, p in zip(queries, *clf.predict(queries))]
    for r in rows: print('\t'.join(r))
    if args.out:
        with open(args.out, 'w', newline='') as f: csv.writer(f).writerows([('file', 'label', 'probability'), *rows])


_INTS = ('gpu', 'size', 'num_workers')


def _option_flags(p, names):
    "A flag for each of the `train` options `names`, typed by its default, under the original code's name too."
    from .config import ALIASES, options
    opts, old = options(), {new: o for o, new in ALIASES.items()}
    for name in names:
        default, help = opts[name]
        kw = dict(default=argparse.SUPPRESS, help=f"{help} (default: {default})")   # only flags given reach `train`
        if name == 'pretrained': kw.update(nargs='?', const=True, metavar='PATH')
        elif name == 'arch_kwargs': kw.update(type=json.loads, metavar='JSON')
        elif isinstance(default, bool): kw.update(action='store_true')
        elif name in _INTS or isinstance(default, int): kw.update(type=int)
        elif isinstance(default, float): kw.update(type=float)
        _flag(p, name, *([old[name]] if name in old else []), dest=name, **kw)
        if name == 'precision':   # the original code's flags of it
            for k in ('fp16', 'bf16'):
                _flag(p, k, action='store_true', default=argparse.SUPPRESS, help=f"the original code's flag: --precision {k}")


def _print_results(results):
    from .distributed import is_main
    if not is_main(): return   # every process holds the same results
    print(f"test accuracy, mean ± 95% CI:\n{results!r}")


def _train(args):
    "Train, then print the final test results (or only test, with --test_only)."
    from .distributed import is_main
    from .train import evaluate_checkpoint, train
    opts = {k: v for k, v in vars(args).items() if k not in ('command', 'run')}
    if opts.pop('test_only', False):
        if not opts.get('load_path'): raise ValueError("--test_only tests a checkpoint: give --load_path too")
        _print_results(evaluate_checkpoint(**opts))
    else:
        res = train(**opts)
        if is_main(): print(res)


def _test(args):
    "Test a checkpoint and print the results: on its own test classes, or one table over several domains."
    from .distributed import is_main
    from .domains import evaluate_checkpoint_domains, wants_domains
    from .train import evaluate_checkpoint
    opts = {k: v for k, v in vars(args).items() if k not in ('command', 'run', 'dataset', 'bscd', 'split', 'download')}
    if wants_domains(args):
        res = evaluate_checkpoint_domains(datasets=args.dataset, bscd=args.bscd, split=args.split, download=args.download, **opts)
        if is_main(): print(res)
    else: _print_results(evaluate_checkpoint(**opts, **({'dataset': args.dataset[0]} if args.dataset else {})))


def main(argv=None):
    "Entry point of the `fsmtl` command."
    p = argparse.ArgumentParser(prog='fsmtl', description='Multi-task learning for few-shot image classification.')
    sub = p.add_subparsers(dest='command', required=True, metavar='COMMAND')
    d = sub.add_parser('data', help='download, check and summarise a benchmark',
                       description='Download (when needed), check and summarise a few-shot benchmark.')
    _flag(d, 'dataset', default='glyphs',
          help='glyphs (embedded, the default), glyphs-small (its 20 images a class), cifarfs, fc100, mini-imagenet, tiered-imagenet, or folder')
    _flag(d, 'root', default='~/data', help='folder of the data folders; for folder, your folder of images')
    _flag(d, 'no_download', action='store_true', help='fail, naming the missing files, instead of downloading them')
    _flag(d, 'show', metavar='PNG', help='save a picture of a training batch here')
    d.set_defaults(run=_data)
    q = sub.add_parser('predict', help='classify images of new classes from a few examples of each',
                       description='Classify the images of a query folder into new classes, each given by a few example '
                                   'images, with the backbone of a checkpoint and a probe fitted on the examples. '
                                   'Prints one line per query image: file name, label, probability; unreadable query images are '
                                   'named on stderr and skipped.')
    _flag(q, 'checkpoint', required=True, metavar='PATH',
          help='a saved FewShotClassifier, or any checkpoint with the backbone and its arch, size, mean and std')
    _flag(q, 'support', required=True, metavar='DIR', help='a folder of class folders of example images; folder name = class')
    _flag(q, 'query', required=True, metavar='DIR', help='a folder of the images to classify, taken in order of file name')
    _flag(q, 'probe', default='logistic', choices=['logistic', 'sklearn', 'proto'],
          help='classifier fitted on the features of the examples (default: logistic)')
    _flag(q, 'out', metavar='CSV', help='also write the predictions here, as file,label,probability')
    q.set_defaults(run=_predict)
    # the flags of train and test come from the configs, which import fastai's training stack: made for those commands
    # alone, so that `fsmtl data`, `fsmtl predict` and `fsmtl --help` start without it
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith('-')), None)
    t = sub.add_parser('train', help='train a backbone (multi-task learning, pretraining or a meta-learner) and test it',
                       description='Train a backbone by multi-task learning (--algorithm mtl, the default), pretraining or a '
                                   'meta-learner, then test its best checkpoint on 5-way 1- and 5-shot episodes. Flags are '
                                   'named as in fastai, or as in the original code, with underscores or hyphens.')
    if command == 'train':
        from .config import options
        _option_flags(t, [k for k in options() if k != 'progress'])
    t.set_defaults(run=_train)
    e = sub.add_parser('test', help="test a checkpoint's backbone on the test episodes, of its benchmark or of other domains",
                       description="Test the backbone of a checkpoint (best.pth, or a run folder) on 1- and 5-shot episodes "
                                   "of its benchmark's test classes: mean accuracy and 95% confidence interval. Several "
                                   "--dataset values, a torchvision: or folder: domain, --bscd or --split give one table "
                                   "over the domains, written to the run folder (test_domains.md, test_<domain>.json).")
    _flag(e, 'load_path', required=True, metavar='CKPT', help='a checkpoint file, or a run folder (its best.pth)')
    if command == 'test':
        from .config import TEST_OPTIONS
        from .domains import add_domain_flags
        _option_flags(e, [o for o in TEST_OPTIONS if o != 'dataset'])
        add_domain_flags(e)
    e.set_defaults(run=_test)
    args = p.parse_args(argv)
    try: args.run(args)
    except (ValueError, OSError, RuntimeError, ImportError, FloatingPointError) as e:
        # fastai prefixes errors raised in a callback with the callback's name and event: the user needs the cause
        from .distributed import peer_failed, rank, world
        why = str(e).split(chr(10) + chr(9))[-1]
        if peer_failed(e): why = f"another process of the run stopped; its own message says why ({why})"
        where = f" (process {rank()} of {world()})" if world() > 1 else ''
        print(f"fsmtl {args.command}{where}: {why}", file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
