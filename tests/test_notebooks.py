"The tutorial notebooks: all there, committed clean (no outputs that could contradict the code), and run by `make test`."
import json
from pathlib import Path

import pytest

NBS = Path(__file__).parents[1] / 'nbs'
NAMES = ['00_quickstart', '01_benchmarks', '02_your_images_with_timm', '03_evaluation', '04_training_options',
         '05_mtl_and_meta_learning', '06_other_domains']


def test_the_tutorials_are_there():
    assert sorted(p.stem for p in NBS.glob('*.ipynb')) == NAMES


@pytest.mark.parametrize('name', NAMES)
def test_committed_clean(name):
    nb = json.loads((NBS / f'{name}.ipynb').read_text())
    code = [c for c in nb['cells'] if c['cell_type'] == 'code']
    assert code and all(c['outputs'] == [] and c['execution_count'] is None for c in code)
    assert nb['cells'][0]['cell_type'] == 'markdown' and ''.join(nb['cells'][0]['source']).startswith('# ')
    assert "from fsmtl.all import *" in ''.join(''.join(c['source']) for c in code)


def test_make_test_runs_them():
    makefile = (Path(__file__).parents[1] / 'Makefile').read_text()
    assert 'nbdev_test --path nbs' in makefile and '\ntest: pytest nbtest' in makefile
