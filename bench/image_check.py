"""What decoding every image costs when a folder benchmark is read: `folder_benchmark` with and without the check.

Writes `--images` JPEGs of `--side` x `--side` px (noise on a colour per class, quality 90) into `--classes` class
folders in a temporary folder, then reads the folder with `folder_benchmark` as `fsmtl data` and `train` do (best of
`--repeats`), and again with the decoding check left out (listing, splitting and the link checks only). Prints both
times, the check's time per image, and the ratio.
Run: `python bench/image_check.py [--images 2000] [--side 84] [--classes 20] [--repeats 3]`.
"""
import argparse
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image

from fsmtl.data import benchmarks


def write_folder(root, n, side, classes):
    "`n` JPEGs of `side` px spread over `classes` class folders under `root`."
    rng = np.random.default_rng(0)
    for i in range(n):
        c = i % classes
        (root / f'c{c:03d}').mkdir(exist_ok=True)
        im = (rng.normal(0, 30, (side, side, 3)) + 12 * c).clip(0, 255).astype(np.uint8)
        Image.fromarray(im).save(root / f'c{c:03d}' / f'{i:05d}.jpg', quality=90)


def best_time(fn, repeats):
    "The shortest of `repeats` wall-clock times of `fn()`, in seconds."
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--images', type=int, default=2000)
    p.add_argument('--side', type=int, default=84)
    p.add_argument('--classes', type=int, default=20)
    p.add_argument('--repeats', type=int, default=3)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        write_folder(root, a.images, a.side, a.classes)
        read = lambda: benchmarks.folder_benchmark(root)
        with_check = best_time(read, a.repeats)
        with mock.patch.object(benchmarks, 'check_images', lambda *args, **kw: None):
            without = best_time(read, a.repeats)
    cost = with_check - without
    print(f"{a.images} JPEGs of {a.side}x{a.side} px: read in {with_check:.2f} s with the decoding check, "
          f"{without:.2f} s without; the check costs {cost:.2f} s ({1e3 * cost / a.images:.2f} ms an image), "
          f"ratio {with_check / without:.1f}x")


if __name__ == '__main__':
    main()
