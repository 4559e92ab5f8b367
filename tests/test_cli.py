import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fsmtl.cli import main


@pytest.fixture
def image_folder(tmp_path):
    "Ten classes of eight small JPEGs each, one colour a class."
    for c in range(10):
        (tmp_path / 'images' / f'class{c}').mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.full((20, 24, 3), 20 * c + i, np.uint8)).save(tmp_path / 'images' / f'class{c}' / f'{i}.jpg')
    return tmp_path / 'images'


@pytest.mark.parametrize('flag', ['--no_download', '--no-download'])
def test_data_summarises_a_folder(image_folder, tmp_path, capsys, flag):
    png = tmp_path / 'batch.png'
    assert main(['data', '--dataset', 'folder', '--root', str(image_folder), flag, '--show', str(png)]) == 0
    out = capsys.readouterr().out
    assert '84x84 images' in out  # folder images are resized to 84 by default
    lines = [l.split() for l in out.splitlines() if l.strip().startswith(('train', 'val', 'test'))]
    assert [(l[0], int(l[1]), int(l[3])) for l in lines] == [('train', 6, 48), ('val', 2, 16), ('test', 2, 16)]
    assert png.stat().st_size > 1000


def test_data_missing_files_offline(tmp_path, capsys):
    assert main(['data', '--dataset', 'cifar-fs', '--root', str(tmp_path), '--no-download']) == 2
    err = capsys.readouterr().err
    assert 'cifar-100-python.tar.gz' in err and str(tmp_path / 'cifar100') in err


def test_unknown_dataset(capsys):
    assert main(['data', '--dataset', 'imagenet-1k']) == 2
    assert 'mini-imagenet' in capsys.readouterr().err


def test_no_command():
    with pytest.raises(SystemExit): main([])



@pytest.mark.parametrize('argv', [['--help'], ['data', '--help'], ['predict', '--help']])
def test_help_without_the_training_stack(argv):
    "`fsmtl --help`, `fsmtl data --help` and `fsmtl predict --help` import neither torch nor fastai nor timm."
    code = (f"import sys\nfrom fsmtl.cli import main\ntry: main({argv!r})\nexcept SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'fastai', 'timm') if m in sys.modules))")
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.rstrip().endswith('[]'), res.stdout + res.stderr


def test_train_and_test_help_list_their_flags(capsys):
    "The flags of train and test, made for those commands alone, under fastai's names and the original code's."
    out = {}
    for c in ('train', 'test'):
        with pytest.raises(SystemExit): main([c, '--help'])
        out[c] = capsys.readouterr().out
    for flag in ('--val_episodes', '--val_epoch_length', '--opt', '--optim', '--algorithm', '--max_epochs'): assert flag in out['train']
    for flag in ('--load_path', '--test_episodes', '--final_test_epoch_length', '--bscd'): assert flag in out['test']
    assert '--max_epochs' not in out['test']
