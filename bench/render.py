"""How long the embedded benchmark takes to render: `glyphs` (300 images a class) and `glyphs-small` (20), from scratch.

Each renders into a fresh temporary folder, as on a machine that has never rendered it: the wall seconds, the CPU
seconds of the process (all its threads), the images and classes, and the size of the cache it writes.
Run: `python bench/render.py [--threads 2] [--n_images 300,20]`.
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from fsmtl.data.core import SPLITS
from fsmtl.data.glyphs import glyphs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--n_images', default='300,20', help='images a class, comma-separated: one render each')
    p.add_argument('--threads', type=int, default=torch.get_num_threads(), help='torch threads')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f'| images a class | wall s | CPU s | images | classes | cache MB |  (torch threads: {args.threads})\n|---|---|---|---|---|---|')
    for n in (int(v) for v in args.n_images.split(',')):
        with tempfile.TemporaryDirectory() as root:
            wall, cpu = time.perf_counter(), time.process_time()
            fs = glyphs(root, n_images=n, progress=False)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            mb = sum(f.stat().st_size for f in (Path(root) / 'glyphs').iterdir()) / 2 ** 20
            print(f"| {n} | {wall:.1f} | {cpu:.1f} | {sum(len(fs[s]) for s in SPLITS)} "
                  f"| {' / '.join(str(fs[s].n_classes) for s in SPLITS)} | {mb:.0f} |", flush=True)


if __name__ == '__main__':
    main()
