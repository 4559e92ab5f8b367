"Every code block of README.md runs: Python blocks in one namespace, shell blocks that call `fsmtl` by the installed command."
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).parents[1] / 'README.md').read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)


@pytest.fixture(scope='module')
def python_blocks():
    "Run the Python blocks in order, in one namespace; the shell blocks use the files they write."
    blocks = [code for lang, code in BLOCKS if lang == 'python']
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
    known = {'make train', 'make test', 'pip install torch==2.14.1 torchvision==0.29.1',
             'bash tools/install.sh /path/to/your/venv'}
    assert {c for c in _commands('sh') if not c.startswith('fsmtl ')} == known
    assert all(t in (Path(__file__).parents[1] / 'Makefile').read_text() for t in ('\ntrain:', '\ntest:'))
