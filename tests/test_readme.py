"Every code block of README.md runs: Python blocks in one namespace, shell blocks that call `fsmtl` by the installed command."
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).parents[1] / 'README.md').read_text()
pytestmark = pytest.mark.slow   # the README's own runs, as written
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)


@pytest.fixture(scope='module')
def python_blocks():
    "Run the Python blocks in order, in one namespace; the shell blocks use the files they write."
    blocks = [code for lang, code in BLOCKS if lang == 'python']
    # the README's runs go to /tmp/fsmtl-runs, and fsmtl refuses a new run into a folder that holds one: start afresh
    shutil.rmtree('/tmp/fsmtl-runs', ignore_errors=True)
    ns = {}
    for code in blocks: exec(compile(code, 'README.md', 'exec'), ns)
    return blocks


def test_python_blocks_run(python_blocks):
    assert python_blocks


def _commands(lang):
    return [l.split('#')[0].strip() for code in (c for g, c in BLOCKS if g == lang) for l in code.splitlines() if l.strip()]


@pytest.mark.parametrize('cmd', [c for c in _commands('sh') if c.startswith('fsmtl ')])
def test_fsmtl_commands_run(cmd, python_blocks):
    exe = Path(sys.executable).parent / 'fsmtl'
    res = subprocess.run([str(exe), *shlex.split(cmd)[1:]], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr


def test_other_shell_commands_are_known():
    "The remaining shell lines are the Makefile's targets and the install steps, which `make test` itself goes through."
    known = {'make train', 'make test', 'make quicktest', 'make notebooks', 'make docs', 'make docs-check',
             'pip install torch==2.14.1 torchvision==0.29.1', 'bash tools/install.sh /path/to/your/venv'}
    assert {c for c in _commands('sh') if not c.startswith('fsmtl ')} == known
    targets = ('train', 'test', 'quicktest', 'notebooks', 'docs', 'docs-check')
    assert all(f'\n{t}:' in (Path(__file__).parents[1] / 'Makefile').read_text() for t in targets)


def test_install_lines_are_what_install_sh_runs():
    "The README's pip line is the one `tools/install.sh` (which `make test` runs) starts with, and the editable install it names is there too."
    script = (Path(__file__).parents[1] / 'tools' / 'install.sh').read_text().replace('$pip install -q ', 'pip install ')
    pips = [c for c in _commands('sh') if c.startswith('pip ')]
    assert pips and all(c in script for c in pips)
    assert 'pip install -e ".[dev,wandb,optim,tensorboard]"' in script and '`pip install -e ".[dev,wandb,optim,tensorboard]"`' in README


def test_make_train_command_runs_shortened(tmp_path, glyph_root):
    "`make train`'s own command line, with epochs and episodes cut down: every flag it passes is valid and it prints both shot counts."
    makefile = (Path(__file__).parents[1] / 'Makefile').read_text()
    recipe = re.search(r"\ntrain:.*?\n\t(\$\(VENV\)/bin/fsmtl train .*?)\n\n", makefile, re.S).group(1).replace('\\\n\t\t', '')
    args = shlex.split(recipe)[2:] + ['--max_epochs', '1', '--epoch_length', '12', '--val_epoch_length', '10',
                                      '--final_test_epoch_length', '20', '--log_dir', str(tmp_path), '--root', str(glyph_root),
                                      '--dataset', 'glyphs-small']
    assert '--baseline' in args and '--max_epochs' in args[:-16]
    res = subprocess.run([str(Path(sys.executable).parent / 'fsmtl'), 'train', *args], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert re.search(r'5-way 1-shot: [\d.]+ ± [\d.]+% \(20 episodes\)\s+untrained backbone', res.stdout)
    assert re.search(r'5-way 5-shot: [\d.]+ ± [\d.]+% \(20 episodes\)\s+untrained backbone', res.stdout)


def test_recipes_table_is_fsmtl_recipes():
    from fsmtl.train import RECIPES, recipe_command
    rows = [l for l in README.splitlines() if l.startswith('| ') and 'fsmtl train --dataset' in l]
    assert len(rows) == len(RECIPES)
    for r, row in zip(RECIPES, rows):
        cells = [c.strip() for c in row.strip('|').split('|')]
        assert cells[1:4] == [str(r['shots']), f"`{recipe_command(r)}`", r['paper']] and cells[4] == 'not measured yet'


def test_citation_is_well_formed():
    "The one BibTeX entry: balanced braces and the paper's title, authors, venue and year."
    (entry,) = [c for lang, c in BLOCKS if lang == 'bibtex']
    assert entry.count('{') == entry.count('}') and entry.startswith('@inproceedings{')
    fields = dict(re.findall(r"^\s*(\w+)\s*=\s*\{(.*)\},?$", entry, re.M))
    assert fields['title'].startswith('Bridging Multi-Task Learning and Meta-Learning')
    assert fields['author'] == 'Wang, Haoxiang and Zhao, Han and Li, Bo' and fields['year'] == '2021'
    assert 'International Conference on Machine Learning' in fields['booktitle']
