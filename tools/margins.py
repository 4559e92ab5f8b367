"""The margins of the statistical tests under two thread counts and two seeds, as a table.

Each test marked `statistical` compares accuracies on the same episodes by `assert_gain` (tests/helpers.py), which
appends its paired gain, CI and margin (gain / CI) to the file that FSMTL_MARGINS names. This runs those tests under
FSMTL_TEST_THREADS 1 and 2 and FSMTL_TEST_SEED 0 and 1 and prints each comparison's margin in each setting.
Usage: python tools/margins.py [--threads 1 2] [--seeds 0 1] [--out margins.md]
"""
import argparse, json, os, subprocess, sys, tempfile
from pathlib import Path

import pandas as pd

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument('--threads', type=int, nargs='+', default=[1, 2])  # torch threads of the tests
p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])    # training seeds of the tests
p.add_argument('--out', type=Path)                                 # also write the table here (markdown)
args = p.parse_args()

log = Path(tempfile.mkdtemp()) / 'margins.jsonl'
failed = False
for threads in args.threads:
    for seed in args.seeds:
        env = dict(os.environ, FSMTL_MARGINS=str(log), FSMTL_TEST_THREADS=str(threads), FSMTL_TEST_SEED=str(seed))
        print(f"== threads {threads}, seed {seed}", flush=True)
        rc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-m', 'statistical', '-p', 'no:cacheprovider',
                             'tests'], env=env, cwd=Path(__file__).parents[1]).returncode
        failed |= rc != 0
rows = pd.DataFrame([json.loads(l) for l in log.read_text().splitlines()]) if log.exists() else pd.DataFrame()
if rows.empty: sys.exit("no margins were recorded: no test marked statistical ran")
rows['setting'] = 'threads ' + rows.threads.astype(str) + ', seed ' + rows.seed.astype(str)
rows['cell'] = rows.apply(lambda r: f"{100 * r.gain:+.1f} ± {100 * r.ci95:.1f} ({r.margin:.1f})", axis=1)
table = rows.pivot_table(index='test', columns='setting', values='cell', aggfunc='first')
table['smallest margin'] = rows.groupby('test').margin.min().round(2)
cols = ['test', *table.columns]
lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
lines += ['| ' + ' | '.join([str(t), *map(str, r)]) + ' |' for t, r in zip(table.index, table.values)]
md = ("Paired gain in points ± its 95% CI (margin = gain / CI)\n\n" + '\n'.join(lines) +
      f"\n\nsmallest margin: {rows.margin.min():.2f}\n")
print(md)
if args.out: args.out.write_text(md)
sys.exit(1 if failed else 0)
