"""Execute the tutorials in `nbs/` as `nbdev_test` does and save them with their outputs, or list the stale ones.

Each notebook runs in a fresh process under `IN_TEST=1` (the tests' small settings), skipping the cells that
`nbdev_test` skips, and is saved cleaned by nbdev's `clean_nb` with settings.ini's keys. Its metadata keeps the
sha256 of its code cells as they were executed (`fsmtl.executed_code`): a code cell changed since makes it stale.
Usage: python tools/notebooks.py run [NB ...]   |   python tools/notebooks.py check [NB ...]
"""
import argparse, configparser, hashlib, json, os, re, sys, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
KEY = 'fsmtl'


def code_hash(nb):
    "The sha256 of the sources of `nb`'s code cells, in order."
    cells = [c['source'] if isinstance(c['source'], str) else ''.join(c['source'])
             for c in nb['cells'] if c['cell_type'] == 'code']
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()


def stale(path):
    "Why the notebook at `path` does not show the outputs of its code, or None if it does."
    nb = json.loads(Path(path).read_text(encoding='utf-8'))
    recorded = nb.get('metadata', {}).get(KEY, {}).get('executed_code')
    if recorded is None: return 'never executed by tools/notebooks.py run'
    if recorded != code_hash(nb): return 'its code cells changed since it was executed'
    return None


def _skipped(path):
    "Indices of the cells of `path` that `nbdev_test` skips (its `tst_flags`, `#| eval: false`)."
    from nbdev.config import get_config
    from nbdev.frontmatter import FrontmatterProc
    from nbdev.process import NBProcessor
    flags = set(get_config().tst_flags.split())
    nb = NBProcessor(path, procs=FrontmatterProc, process=True).nb
    def skip(c):
        direc = getattr(c, 'directives_', {}) or {}
        return c.cell_type == 'code' and (direc.get('eval:', [''])[0].lower() == 'false' or bool(flags & direc.keys()))
    return {c.idx_ for c in nb.cells if skip(c)}


def ignored_warnings():
    "(message regex, category name) of each warning that pytest.ini ignores: libraries' deprecation notices."
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / 'pytest.ini')
    lines = filter(None, map(str.strip, cfg['pytest']['filterwarnings'].splitlines()))
    return [tuple(l.split(':')[1:3]) for l in lines if l.startswith('ignore:')]


def drop_ignored_warnings(nb):   # a notebook with outputs
    "Remove from `nb`'s stderr outputs each warning that pytest.ini ignores, with the source line printed under it."
    pats = [re.compile(rf'^.+:\d+: {cat}: {msg}') for msg, cat in ignored_warnings()]
    for c in nb['cells']:
        for o in [o for o in c.get('outputs', []) if o.get('name') == 'stderr']:
            kept, dropping = [], False
            for line in o['text']:
                dropping = any(p.match(line) for p in pats) or dropping and line.startswith(' ')
                if not dropping: kept.append(line)
            if kept: o['text'] = kept
            else: c['outputs'].remove(o)
    return nb


def execute(path):
    "Run the notebook at `path` top to bottom as `nbdev_test` does, and save it cleaned with its outputs; seconds taken."
    os.environ['IN_TEST'] = '1'
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from nbdev.clean import clean_nb
    from nbdev.config import get_config
    path, start = Path(path).resolve(), time.time()
    skip, nb = _skipped(path), read_nb(path)
    shell = CaptureShell(path, mpl_format='png')   # PNGs at the figures' own size: retina ones have 4 times the pixels
    cwd = os.getcwd()
    os.chdir(path.parent)
    try: shell.run_all(nb, exc_stop=True, preproc=lambda c: c.idx_ in skip)
    except Exception: raise RuntimeError(shell.prettytb(fname=path)) from None
    finally: os.chdir(cwd)
    nb.metadata[KEY] = dict(executed_code=code_hash(nb))
    drop_ignored_warnings(nb)
    cfg = get_config(path=ROOT)
    clean_nb(nb, cfg.clear_all, cfg.allowed_metadata_keys.split(), cfg.allowed_cell_metadata_keys.split(), cfg.clean_ids)
    write_nb(nb, path)
    return time.time() - start


def _notebooks(names):
    "The notebooks named in `names` (stems or paths), or every tutorial."
    return [Path(n) if n.endswith('.ipynb') else NBS / f'{n}.ipynb' for n in names] or sorted(NBS.glob('*.ipynb'))


def main(args=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('action', choices=['run', 'check'])   # execute and save, or list the stale notebooks
    p.add_argument('names', nargs='*')                    # notebooks (stems or paths); all of nbs/ if none
    a = p.parse_args(args)
    paths = _notebooks(a.names)
    if a.action == 'check':
        bad = {p.name: why for p in paths if (why := stale(p))}
        for n, why in bad.items(): print(f"{n}: {why}; run: python tools/notebooks.py run {Path(n).stem}")
        return 1 if bad else 0
    for p in paths:   # one fresh process a notebook, as nbdev_test runs them
        with ProcessPoolExecutor(1) as pool: print(f"{p.name}: {pool.submit(execute, p).result():.0f} s", flush=True)
    return 0


if __name__ == '__main__': sys.exit(main())
