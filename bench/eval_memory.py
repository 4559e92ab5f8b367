"""Peak memory of the final test, `evaluate(..., split='test')`, at 50 query images a class against 15 (goal: within 1.2x).

Synthetic mini-ImageNet-like data (20 classes x 70 random 84x84 images a split, seeded; mean/std 0.5/0.25) and a
fixed-seed untrained 640-feature resnet10t. Each setting runs in a fresh child process, so that peaks do not mix:
the child builds data and model, notes its resident memory, then runs `evaluate(model, splits, 'test', ways=5,
shots=5, queries=Q, episodes=E)` while a thread samples VmRSS every 2 ms; where the kernel lets it, the peak is also
read from VmHWM, reset right before the call (exact, not sampled), and `ru_maxrss` is reported as well (the
process's lifetime peak). With `--device cuda` the model and episodes live on the GPU, the CUDA libraries are loaded
by a tiny forward pass and probe fit before the baseline, and `torch.cuda.max_memory_allocated()` is reported too.
Queries 15 also runs at twice the episodes, to show that memory does not grow with them.

The children run with glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_=131072), so that every large
buffer is returned to the system when freed and the peaks repeat to the MiB. Under glibc's default, its dynamic
threshold keeps the first batch's freed buffers in the heap, which later batches reuse more or less well: a cold
process's peak then varies by some 20% (here 284 to 365 MiB over the baseline for the same setting), enough to
move the ratio between 1.15 and 1.38 from run to run. `--glibc-default` measures that way, each setting `--repeats`
times (default 2 there), interleaved, its lowest peak counting. The peak up to the end of the first batch is shown
too: it is the same either way.
Run: `python bench/eval_memory.py [--device cpu|cuda] [--episodes N] [--glibc-default] [--repeats N]`.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

MiB = 2 ** 20
MMAP_THRESHOLD = 128 * 1024   # glibc's initial value, here kept fixed


def status(key):
    "A field of /proc/self/status in bytes (VmRSS, VmHWM)."
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'): return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_hwm():
    "Reset the kernel's peak RSS (VmHWM) to the current RSS; whether it worked."
    try:
        with open('/proc/self/clear_refs', 'w') as f: f.write('5')
        return status('VmHWM') <= status('VmRSS') + 4 * MiB
    except OSError:
        return False


class Sampler(threading.Thread):
    "The largest VmRSS seen, sampled every `every` seconds until `stop()`."
    def __init__(self, every=0.002):
        super().__init__(daemon=True)
        self.every, self.peak, self.done = every, status('VmRSS'), threading.Event()
    def run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, status('VmRSS'))
            time.sleep(self.every)
    def stop(self):
        self.done.set()
        self.join()
        self.peak = max(self.peak, status('VmRSS'))
        return self.peak


def child(queries, episodes, device):
    "Run one setting; print its figures as one JSON line."
    import numpy as np
    import timm
    import torch
    from fsmtl.data.core import FewShotSplits, Split
    from fsmtl.evaluate import evaluate

    rng = np.random.default_rng(0)
    def split(prefix, n_classes=20, per_class=70, size=84):
        items = rng.integers(0, 256, (n_classes * per_class, size, size, 3), dtype=np.uint8)
        return Split(items, np.repeat(np.arange(n_classes), per_class), [f'{prefix}{i}' for i in range(n_classes)])
    splits = FewShotSplits('synthetic', split('train'), split('val'), split('test'), (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(0)
    model = timm.create_model('resnet10t', num_classes=0, channels=(64, 160, 320, 640)).to(device).eval()
    cuda = torch.device(device).type == 'cuda'
    if cuda:   # load cuDNN, cuBLAS and cuSOLVER first: their host memory would dwarf what the call itself needs
        from fsmtl.probe import LogisticProbe
        with torch.no_grad(): model(torch.zeros(2, 3, 84, 84, device=device))
        LogisticProbe().fit(torch.randn(2, 10, 640, device=device), torch.arange(5, device=device).repeat(2, 2)).predict(
            torch.randn(2, 3, 640, device=device))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_base = torch.cuda.memory_allocated()

    # the peak up to the end of the first batch's forward pass, read by wrapping the name the probe's scorer calls (the
    # library is not changed): it does not vary between runs, while later batches add what the allocator keeps
    import fsmtl.scoring as sc
    extract, first = sc.extract_features, {}
    def first_batch(model, x, *args, **kwargs):
        out = extract(model, x, *args, **kwargs)
        if not first:
            if cuda: torch.cuda.synchronize()
            first.update(images=len(x), rss=status('VmHWM') if exact else status('VmRSS'))
            if cuda: first['gpu'] = torch.cuda.max_memory_allocated() - gpu_base
        return out
    sc.extract_features = first_batch
    exact = reset_hwm()
    base = status('VmRSS')
    sampler = Sampler()
    sampler.start()
    t = time.perf_counter()
    res = evaluate(model, splits, split='test', ways=5, shots=5, queries=queries, episodes=episodes, progress=False)
    if cuda: torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    out = dict(queries=queries, episodes=episodes, seconds=seconds, acc=res.mean, base=base, sampled=sampler.stop(),
               maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, threads=torch.get_num_threads())
    if exact: out['hwm'] = status('VmHWM')
    out['first'] = first
    if cuda: out.update(gpu=torch.cuda.max_memory_allocated() - gpu_base, gpu_base=gpu_base)
    print(json.dumps(out))


def run(queries, episodes, device, glibc_default):
    cmd = [sys.executable, __file__, '--child', '--queries', str(queries), '--episodes', str(episodes), '--device', device]
    env = dict(os.environ)
    if glibc_default: env.pop('MALLOC_MMAP_THRESHOLD_', None)
    else: env['MALLOC_MMAP_THRESHOLD_'] = str(MMAP_THRESHOLD)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode: sys.exit(f"child {' '.join(cmd[1:])} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default=None, help="where the model and episodes go; default cuda when available, else cpu")
    p.add_argument('--episodes', type=int, default=None, help='episodes of a setting; default 12 on the CPU, 200 on a GPU')
    p.add_argument('--glibc-default', action='store_true', help="children under glibc's dynamic mmap threshold: peaks vary by ~20%%")
    p.add_argument('--repeats', type=int, default=None,
                   help='runs of each setting, interleaved, the lowest peak counting; default 2 with --glibc-default on the CPU, else 1')
    p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--queries', type=int, default=15, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device is None:
        import torch
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.episodes is None: args.episodes = 200 if args.device.startswith('cuda') else 12
    if args.repeats is None: args.repeats = 2 if args.glibc_default and not args.device.startswith('cuda') else 1
    if args.child: return child(args.queries, args.episodes, args.device)

    E = args.episodes
    settings = [(15, E), (50, E), (15, 2 * E)]
    runs = {k: [] for k in settings}
    for _ in range(args.repeats):
        for q, e in settings: runs[q, e].append(run(q, e, args.device, args.glibc_default))
    peak = lambda r: r.get('hwm', r['sampled'])
    rows = {k: min(rs, key=lambda r: peak(r) - r['base']) for k, rs in runs.items()}
    for (q, e), r in rows.items():
        spread = [(peak(o) - o['base']) / MiB for o in runs[q, e]]
        line = (f"queries {q:2d}  episodes {e:4d}: peak RSS {peak(r) / MiB:7.1f} MiB  increase {(peak(r) - r['base']) / MiB:6.1f} MiB"
                f"  ({f'{len(spread)} runs: {min(spread):.0f}-{max(spread):.0f}; ' if len(spread) > 1 else ''}"
                f"sampled {(r['sampled'] - r['base']) / MiB:.1f}, ru_maxrss {r['maxrss'] / MiB:.1f})  {r['seconds']:5.1f} s")
        line += f"\n{'':23}first batch ({r['first']['images']} images): increase {(r['first']['rss'] - r['base']) / MiB:6.1f} MiB"
        if 'gpu' in r: line += (f"; cuda max allocated +{r['gpu'] / MiB:.1f} MiB, first batch +{r['first']['gpu'] / MiB:.1f}"
                                f" (over {r['gpu_base'] / MiB:.1f})")
        print(line, flush=True)
    inc = {k: peak(r) - r['base'] for k, r in rows.items()}
    a, b, c = inc[15, E], inc[50, E], inc[15, 2 * E]
    print(f"device {args.device}, torch threads {rows[15, E]['threads']}, peak from {'VmHWM (exact)' if 'hwm' in rows[15, E] else 'sampled VmRSS'}, "
          f"glibc {'default (dynamic mmap threshold)' if args.glibc_default else f'MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}'}")
    print(f"50 vs 15 queries: increase {b / MiB:.1f} vs {a / MiB:.1f} MiB = {b / a:.2f}x (goal <= 1.2x); "
          f"total peak {peak(rows[50, E]) / MiB:.1f} vs {peak(rows[15, E]) / MiB:.1f} MiB")
    f1 = {k: r['first']['rss'] - r['base'] for k, r in rows.items()}
    print(f"50 vs 15 queries, first batch alone: {f1[50, E] / MiB:.1f} vs {f1[15, E] / MiB:.1f} MiB = {f1[50, E] / f1[15, E]:.2f}x")
    print(f"15 queries, {2 * E} vs {E} episodes: increase {c / MiB:.1f} vs {a / MiB:.1f} MiB = {c / a:.2f}x")
    if 'gpu' in rows[15, E]:
        g = {k: r['gpu'] for k, r in rows.items()}
        print(f"cuda max allocated: 50 vs 15 queries {g[50, E] / MiB:.1f} vs {g[15, E] / MiB:.1f} MiB = {g[50, E] / g[15, E]:.2f}x "
              f"(first batch {rows[50, E]['first']['gpu'] / rows[15, E]['first']['gpu']:.2f}x); "
              f"{2 * E} vs {E} episodes {g[15, 2 * E] / g[15, E]:.2f}x")
    print(f"ratio: {b / a:.2f}")


if __name__ == '__main__':
    main()
