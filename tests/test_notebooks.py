"The tutorial notebooks: all there, committed with the outputs of their own code (cleaned by nbdev), and run by `make test`."
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
NBS = ROOT / 'nbs'
NAMES = ['00_quickstart', '01_benchmarks', '02_your_images_with_timm', '03_evaluation', '04_training_options',
         '05_mtl_and_meta_learning', '06_other_domains']
sys.path.insert(0, str(ROOT / 'tools'))
from notebooks import KEY, code_hash, drop_ignored_warnings, stale  # noqa: E402

# what a committed notebook may weigh: plots and tables (02 shows two grids of noisy pictures, 0.7 MB), no widget state
MAX_BYTES = 800_000


def _load(path): return json.loads(Path(path).read_text())


def test_the_tutorials_are_there():
    assert sorted(p.stem for p in NBS.glob('*.ipynb')) == NAMES


@pytest.mark.parametrize('name', NAMES)
def test_committed_with_fresh_outputs(name):
    path = NBS / f'{name}.ipynb'
    assert stale(path) is None, f"{name}: {stale(path)}; run: python tools/notebooks.py run {name}"
    nb = _load(path)
    code = [c for c in nb['cells'] if c['cell_type'] == 'code']
    assert sum(len(c['outputs']) for c in code) >= 3, "a reader sees what the calls give"
    assert all(c['execution_count'] is None and c['metadata'] == {} for c in code), "nbdev_clean's cleaning"
    assert set(nb['metadata']) <= {'kernelspec', KEY}
    assert not [o for c in code for o in c['outputs'] if o['output_type'] == 'error']
    assert not [o for c in code for o in c['outputs'] if any(k.startswith('application/vnd.jupyter.widget') for k in o.get('data', {}))]
    assert not [o for c in code for o in c['outputs'] if '\r' in ''.join(o.get('text', ''))], "progress-bar frames"
    assert path.stat().st_size < MAX_BYTES
    assert nb['cells'][0]['cell_type'] == 'markdown' and ''.join(nb['cells'][0]['source']).startswith('# ')
    assert "from fsmtl.all import *" in ''.join(''.join(c['source']) for c in code)


@pytest.mark.parametrize('name', ['00_quickstart', '03_evaluation'])
def test_plots_are_shown(name):
    outs = [o for c in _load(NBS / f'{name}.ipynb')['cells'] for o in c.get('outputs', [])]
    assert any('image/png' in o.get('data', {}) for o in outs)


def test_stale_outputs_are_reported(tmp_path):
    "An edited code cell makes a notebook stale; an edited markdown cell does not; a notebook never run is stale."
    nb = _load(NBS / '00_quickstart.ipynb')
    def saved(nb, name):
        (tmp_path / name).write_text(json.dumps(nb))
        return tmp_path / name
    assert stale(saved(nb, 'same.ipynb')) is None
    code = next(c for c in nb['cells'] if c['cell_type'] == 'code' and c['outputs'])
    code['source'] = code['source'] + ['\nprint(1)']
    assert 'code cells changed' in stale(saved(nb, 'code.ipynb'))
    code['source'] = code['source'][:-1]
    next(c for c in nb['cells'] if c['cell_type'] == 'markdown')['source'].append(' More words.')
    assert stale(saved(nb, 'words.ipynb')) is None
    del nb['metadata'][KEY]
    assert 'never executed' in stale(saved(nb, 'never.ipynb'))
    res = subprocess.run([sys.executable, str(ROOT / 'tools' / 'notebooks.py'), 'check', str(tmp_path / 'code.ipynb')],
                         capture_output=True, text=True)
    assert res.returncode == 1 and 'code.ipynb: its code cells changed' in res.stdout


def test_ignored_warnings_dropped():
    "The warnings pytest.ini ignores leave a tutorial's outputs, each with the line under it; other stderr stays."
    warn = ['/x/torch/jit/_script.py:1491: FutureWarning: `torch.jit.script` is deprecated. Please switch.\n', '  warnings.warn(\n']
    other = ['/x/mine.py:3: UserWarning: the fallback to the CPU\n', '  warn(msg)\n']
    nb = dict(cells=[dict(cell_type='code', outputs=[dict(name='stderr', output_type='stream', text=warn + other),
                                                     dict(name='stderr', output_type='stream', text=warn)])])
    assert drop_ignored_warnings(nb)['cells'][0]['outputs'] == [dict(name='stderr', output_type='stream', text=other)]


@pytest.mark.slow
def test_run_saves_outputs_and_hash(tmp_path):
    "`tools/notebooks.py run` executes under IN_TEST, skips `#| notest` cells, and saves outputs, cleaned, with the hash."
    cells = [dict(cell_type='markdown', metadata={}, source=['# A title']),
             dict(cell_type='code', metadata={'scrolled': True}, execution_count=None, outputs=[],
                  source=['import os\n', "print(os.environ['IN_TEST'], 6 * 7)"]),
             dict(cell_type='code', metadata={}, execution_count=None, outputs=[], source=['#| notest\n', 'print("skipped")']),
             dict(cell_type='code', metadata={}, execution_count=None, outputs=[], source=['3 + 4'])]
    path = tmp_path / 'tiny.ipynb'
    path.write_text(json.dumps(dict(cells=cells, metadata={'language_info': {'name': 'python'}}, nbformat=4, nbformat_minor=5)))
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    res = subprocess.run([sys.executable, str(ROOT / 'tools' / 'notebooks.py'), 'run', str(path)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    nb = _load(path)
    code = [c for c in nb['cells'] if c['cell_type'] == 'code']
    assert ''.join(code[0]['outputs'][0]['text']) == '1 42\n'
    assert code[1]['outputs'] == []
    assert ''.join(code[2]['outputs'][0]['data']['text/plain']) == '7' and code[2]['outputs'][0]['execution_count'] is None
    assert nb['metadata'][KEY]['executed_code'] == code_hash(nb) and 'language_info' not in nb['metadata']
    assert code[0]['metadata'] == {} and stale(path) is None


def test_make_test_runs_them():
    makefile = (ROOT / 'Makefile').read_text()
    assert 'nbdev_test --path nbs' in makefile and '\ntest: pytest nbtest' in makefile
