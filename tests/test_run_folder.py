"The run folder is the user's: run names inside log_dir, no finished run overwritten, resume that keeps its settings."
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

import fsmtl.files
from fsmtl.cli import main
from fsmtl.train import train
from test_faults import TINY, env, flags

pytestmark = pytest.mark.usefixtures('one_thread')


def shell(*args):
    "`fsmtl args` in a new process, as from a shell: its return code and everything it printed."
    r = subprocess.run([sys.executable, '-m', 'fsmtl', *map(str, args)], capture_output=True, text=True, timeout=300,
                       env=env())
    return r.returncode, r.stdout + r.stderr


def files(folder):
    "Each file under `folder` (relative name) and its bytes."
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def done(glyph_root, tmp_path_factory):
    "A finished one-epoch run, and the options that made it."
    opts = TINY | dict(root=str(glyph_root), log_dir=str(tmp_path_factory.mktemp('done') / 'runs'), run_name='done',
                       max_epochs=1, progress=False)
    return train(**opts), opts


def run_copy(done, tmp_path, name='run', drop=()):
    "A copy of the finished run in a log folder of its own, without the files `drop`; its folder."
    folder = tmp_path / 'runs' / name
    shutil.copytree(done[0].run_dir, folder, ignore=lambda d, names: [n for n in names if n in drop])
    return folder


@pytest.mark.slow
def test_a_run_name_is_one_folder_in_log_dir(glyph_root, tmp_path, capsys):
    # `../userdir` overwrote the user's config.json and history.csv; `.` wrote into log_dir, an absolute path anywhere
    user = tmp_path / 'userdir'
    user.mkdir()
    (user / 'config.json').write_text('mine')
    rc, out = shell('train', *flags(**TINY | dict(root=glyph_root, log_dir=tmp_path / 'runs', run_name='../userdir')))
    assert rc == 2 and 'Traceback' not in out, out[-3000:]
    assert "fsmtl train: run_name must be the name of one folder in log_dir, got '../userdir'" in out
    for name in ('.', '..', str(user), 'a/b'):
        assert main(['train', *flags(**TINY | dict(root=glyph_root, log_dir=tmp_path / 'runs', run_name=name))]) == 2
        assert 'run_name must be the name of one folder in log_dir' in capsys.readouterr().err
    assert files(user) == {'config.json': b'mine'} and not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('drop,left', [(('last.pth',), 'best.pth, results.json, history.csv, config.json, tensorboard'),
                                       (('last.pth', 'best.pth', 'results.json', 'history.csv', 'config.json'), 'tensorboard')])
def test_a_folder_holding_a_run_without_last_pth_is_not_reused(done, tmp_path, capsys, drop, left):
    # a finished run that lost its last.pth was replaced, the TensorBoard events of both runs mixed in one folder
    folder = run_copy(done, tmp_path, drop=drop)
    before = files(folder)
    assert main(['train', *flags(**done[1] | dict(log_dir=tmp_path / 'runs', run_name='run'))]) == 2
    err = capsys.readouterr().err
    assert f"{folder} already holds a run ({left}): it has no last.pth to resume from" in err and 'another run_name' in err
    assert files(folder) == before


@pytest.mark.slow
def test_resume_refuses_flags_that_change_training_and_records_more_epochs(done, tmp_path):
    # --resume took --lr, --optim and --epoch_length silently and rewrote config.json
    folder = run_copy(done, tmp_path)
    before = files(folder)
    rc, out = shell('train', '--resume', '--load_path', folder, '--lr', '0.01', '--optim', 'adam', '--max_epochs', '2')
    assert rc == 2 and 'Traceback' not in out, out[-3000:]
    assert "it was trained with --lr 0.001 (now 0.01), --opt 'radam' (now 'adam')" in out
    assert f"Drop --lr, --opt, or start a new run from its weights: --load_path {folder / 'last.pth'}" in out
    assert files(folder) == before
    # more epochs are meant to change: the run goes on, and its record says how the first epoch was trained
    res = train(resume=True, load_path=str(folder), max_epochs=2, final_test_epoch_length=12, progress=False)
    cfg = json.loads((folder / 'config.json').read_text())
    assert len(res.history) == 2 and cfg['max_epochs'] == 2 and cfg['lr'] == TINY.get('lr', 1e-3)
    assert cfg['resumed'] == [dict(epoch=1, changed=dict(max_epochs=[1, 2], test_episodes=[10, 12]))]
    assert json.loads((folder / 'results.json').read_text())['epochs'] == 2


def test_resume_of_a_finished_run_is_refused(done, tmp_path, capsys):
    # it tested the run again and wrote a training time of 2.8e-06 s into results.json
    folder = run_copy(done, tmp_path)
    before = files(folder)
    assert main(['train', '--resume', '--load_path', str(folder)]) == 2
    assert (f"{folder} holds a finished run (results.json): test it again with fsmtl test --load_path {folder}, or train "
            "it longer with --resume and --max_epochs above 1") in capsys.readouterr().err
    assert files(folder) == before
    assert str(done[0]).startswith('best epoch 0 of epochs 0-0, run in')   # counted from 0, as the epoch table counts


def test_resume_with_an_empty_log_dir_names_the_flags(tmp_path, capsys):
    assert main(['train', '--resume', '--log_dir', str(tmp_path)]) == 2
    assert 'name the run to resume with --load_path (load_path=) or --run_name' in capsys.readouterr().err


def test_a_full_disk_before_the_first_checkpoint_does_not_say_resume(glyph_root, tmp_path, monkeypatch, capsys):
    # it said to continue with --resume, which then found nothing to resume
    def fsync(fd): raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(fsmtl.files.os, 'fsync', fsync)
    assert main(['train', *flags(**TINY | dict(root=glyph_root, log_dir=tmp_path, run_name='run'))]) == 2
    err = capsys.readouterr().err
    assert 'no space left on' in err and 'while writing config.json' in err and '--resume' not in err
    assert f"nothing was saved to resume from: delete {tmp_path / 'run'} and start the run again" in err


@pytest.mark.slow
def test_wandb_online_without_a_login_stops_before_writing(glyph_root, tmp_path):
    # a 38-line traceback, and a run folder left with only config.json
    home = tmp_path / 'home'
    home.mkdir()
    cmd = [sys.executable, '-m', 'fsmtl', 'train', *flags(**TINY | dict(root=glyph_root, log_dir=tmp_path / 'runs',
                                                                         run_name='w', wandb=True))]
    ours = dict(env(), WANDB_MODE='online', HOME=str(home), NETRC=str(home / '.netrc'), WANDB_DIR=str(home))
    ours.pop('WANDB_API_KEY', None)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ours)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and 'Traceback' not in out, out[-3000:]
    assert 'wandb could not start a run in online mode' in out and 'wandb login' in out and 'WANDB_MODE=offline' in out
    assert not (tmp_path / 'runs' / 'w').exists()
