"Runs that survive faults, met as a user meets them: kill -9 from the shell, two runs at once, a full disk, bad files and options."
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback

import fsmtl.files
import fsmtl.train as T
from fsmtl.checkpoint import read_checkpoint
from fsmtl.cli import main
from fsmtl.models import create_backbone
from fsmtl.train import train

pytestmark = pytest.mark.usefixtures('one_thread')

TINY = dict(dataset='glyphs-small', model_kwargs=dict(channels=(8, 16, 16, 32)), meta_batch_size=2, epoch_length=16, val_epoch_length=10,
            final_test_epoch_length=10, scheduler='plateau', decay_patience=1, max_epochs=3)


def flags(**opts):
    "Command-line flags of `opts`, as the original code spells them."
    out = []
    for k, v in opts.items():
        if v is True: out.append(f'--{k}')
        elif v is not False: out += [f'--{k}', json.dumps(v) if isinstance(v, dict) else str(v)]
    return out


def fsmtl_cmd(*args): return [sys.executable, '-m', 'fsmtl.cli', *args]


def env():
    return dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONWARNINGS='ignore')


def start(args, tty=False):
    "Start `fsmtl args`; under a pseudo-terminal when `tty` (progress bars drawn as in a shell), else output to a pipe."
    if not tty:
        return subprocess.Popen(fsmtl_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
    master, slave = os.openpty()
    p = subprocess.Popen(fsmtl_cmd(*args), stdin=slave, stdout=slave, stderr=slave, env=env(), close_fds=True)
    os.close(slave)
    chunks = []
    def drain():
        while True:
            try: data = os.read(master, 65536)
            except OSError: break
            if not data: break
            chunks.append(data)
    t = threading.Thread(target=drain, daemon=True)
    t.start()
    p.tty_output = lambda: (t.join(30), os.close(master), b''.join(chunks).decode(errors='replace'))[-1]
    return p


def finish(p, timeout=300):
    "Wait for `p`; its return code and everything it printed."
    if hasattr(p, 'tty_output'):
        p.wait(timeout)
        return p.returncode, p.tty_output()
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def kill_when(p, ready, timeout=300):
    "SIGKILL `p` as soon as `ready()` holds."
    t0 = time.time()
    while not ready():
        assert p.poll() is None, f"the run ended before it could be killed: {finish(p)[1][-2000:]}"
        assert time.time() - t0 < timeout
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()


def rows(run):
    "Epochs in the run's history.csv so far (the file may be empty between its creation and its header)."
    f = run / 'history.csv'
    return max(0, len(f.read_text().splitlines()) - 1) if f.exists() else 0


@pytest.fixture(scope='module')
def straight(glyph_root, tmp_path_factory):
    "An uninterrupted run from the shell: the reference every interrupted run must reproduce."
    runs = tmp_path_factory.mktemp('faults') / 'runs'
    opts = dict(TINY, root=glyph_root, log_dir=runs)
    rc, out = finish(start(['train', *flags(**opts, run_name='straight')]))
    assert rc == 0, out[-3000:]
    return opts, runs, out


@pytest.mark.slow
def test_output_to_a_file_is_the_epoch_table(straight):
    # a scheduler's log or `> log.txt`: the table and its lines, no progress bars redrawn into the file
    out = straight[2]
    lines = [line for line in out.splitlines() if line.strip()]
    assert '█' not in out and '\r' not in out
    assert lines[0].split()[:4] == ['epoch', 'train_loss', 'valid_loss', 'episodic_acc']
    epochs = [line for line in lines if line.split()[0].isdigit()]
    assert [int(e.split()[0]) for e in epochs] == list(range(TINY['max_epochs']))
    assert len(lines) <= 3 * TINY['max_epochs'] + 4, out


def same_run(a, b):
    "Assert that run folders `a` and `b` hold the same history, weights and test results."
    pd.testing.assert_frame_equal(pd.read_csv(a / 'history.csv').drop(columns='time'),
                                  pd.read_csv(b / 'history.csv').drop(columns='time'))
    la, lb = read_checkpoint(a / 'last.pth'), read_checkpoint(b / 'last.pth')
    assert la['epoch'] == lb['epoch'] == TINY['max_epochs'] and la['lr'] == lb['lr']
    for k in lb['backbone']: assert torch.equal(la['backbone'][k], lb['backbone'][k]), k
    assert torch.equal(la['head'], lb['head'])
    ra, rb = (json.loads((r / 'results.json').read_text()) for r in (a, b))
    assert ra['test'] == rb['test'] and ra['best_epoch'] == rb['best_epoch']


@pytest.mark.slow
def test_kill_9_in_epoch_2_then_resume_from_the_shell_with_bars(straight):
    # rows 1 and 2: resumed under a terminal (bars drawn), it continues to the uninterrupted run's history and weights
    opts, runs, _ = straight
    p = start(['train', *flags(**opts, run_name='cut')])
    kill_when(p, lambda: rows(runs / 'cut') >= 1)
    assert read_checkpoint(runs / 'cut' / 'last.pth')['epoch'] == 1 and rows(runs / 'cut') == 1
    rc, out = finish(start(['train', '--resume', '--load_path', str(runs / 'cut')], tty=True))
    assert rc == 0, out[-3000:]
    assert '█' in out and 'best epoch' in out   # bars were drawn, and the run finished
    same_run(runs / 'cut', runs / 'straight')


@pytest.mark.slow
def test_kill_9_during_the_final_test_then_resume_writes_the_results(straight):
    # row 3: nothing is left to train, so the resumed run only tests, writes results.json and exits 0
    opts, runs, _ = straight
    p = start(['train', *flags(**dict(opts, final_test_epoch_length=400), run_name='late')])
    kill_when(p, lambda: rows(runs / 'late') == TINY['max_epochs'])
    assert not (runs / 'late' / 'results.json').exists()
    rc, out = finish(start(['train', '--resume', '--load_path', str(runs / 'late'), '--final_test_epoch_length', '10']))
    assert rc == 0, out[-3000:]
    same_run(runs / 'late', runs / 'straight')


def test_nothing_to_train_still_tests_and_negative_epochs_are_refused(glyph_root, tmp_path, capsys):
    # row 4
    res = train(**TINY | dict(root=glyph_root, log_dir=tmp_path, run_name='zero', max_epochs=0, progress=False))
    assert len(res.history) == 0 and res.best_epoch is None and set(res.test) == {1, 5}
    saved = json.loads((tmp_path / 'zero' / 'results.json').read_text())
    assert saved['test']['5shot']['mean'] == pytest.approx(res.test[5].mean)
    assert main(['train', '--root', str(glyph_root), '--log_dir', str(tmp_path), '--max_epochs', '-1']) == 2
    assert 'max_epochs must be at least 0, got -1' in capsys.readouterr().err


@pytest.mark.slow
def test_resume_by_run_name_touches_no_other_run(glyph_root, tmp_path, capsys):
    # row 5: run `a` was killed before its first checkpoint; `b` is another, finished run of the same log folder
    opts = TINY | dict(root=glyph_root, log_dir=tmp_path, max_epochs=1, progress=False)
    train(**opts, run_name='b')
    (tmp_path / 'a').mkdir()
    (tmp_path / 'a' / 'config.json').write_text('{}')
    before = {f.name: f.stat().st_mtime_ns for f in (tmp_path / 'b').iterdir()}
    assert main(['train', '--resume', '--run_name', 'a', '--log_dir', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert 'nothing to resume in' in err and str(tmp_path / 'a') in err
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / 'b').iterdir()} == before


@pytest.mark.slow
def test_two_runs_of_one_name_at_once(glyph_root, tmp_path):
    # row 6: the second is refused at once; the folder holds one run, consistent in every file
    opts = dict(TINY, root=glyph_root, log_dir=tmp_path, run_name='twin', max_epochs=2)
    procs = [start(['train', *flags(**opts, seed=seed)]) for seed in (0, 1)]
    (rc0, out0), (rc1, out1) = (finish(p) for p in procs)
    assert sorted([rc0, rc1]) == [0, 2], (out0[-2000:], out1[-2000:])
    winner, loser = (0, out1) if rc0 == 0 else (1, out0)
    assert 'in use by another run' in loser or 'already holds a run' in loser, loser[-2000:]
    run = tmp_path / 'twin'
    assert json.loads((run / 'config.json').read_text())['seed'] == winner
    assert read_checkpoint(run / 'last.pth')['config']['seed'] == winner
    assert pd.read_csv(run / 'history.csv')['epoch'].tolist() == [0, 1]
    assert (run / 'results.json').exists()


def test_a_finished_run_folder_is_not_overwritten(glyph_root, tmp_path):
    opts = TINY | dict(root=glyph_root, log_dir=tmp_path, run_name='done', max_epochs=1, progress=False)
    train(**opts)
    with pytest.raises(FileExistsError, match='already holds a run'): train(**opts)


@pytest.mark.parametrize('bad,message', [
    (dict(train_shots=-2), 'train_shots must be at least 0, got -2'),           # row 10
    (dict(train_queries=-1), 'train_queries must be at least 0, got -1'),
    (dict(train_shots=0, train_queries=0), 'train_shots + train_queries must be at least 1'),
    (dict(test_queries=0), 'test_queries must be at least 1, got 0'),           # row 11
    (dict(val_epoch_length=0), 'val_episodes (val_epoch_length) must be at least 1, got 0'),
    (dict(final_test_epoch_length=0), 'test_episodes (final_test_epoch_length) must be at least 1'),
    (dict(meta_batch_size=4, epoch_length=3), 'epoch_length (3 tasks) is less than one batch'),
    (dict(lr=0.), 'lr must be above 0'), (dict(test_ways=1), 'test_ways must be at least 2'),
    (dict(decay_rate=2.), 'decay_rate multiplies'), (dict(size=0), 'size must be at least 8'),
    (dict(lr=float('inf')), 'lr must be a finite number, got inf'),   # it stopped as NaN, "or train in fp32"
    (dict(freeze_epochs=5, max_epochs=2), 'freeze_epochs (5) is more than max_epochs (2): the backbone would never train')])
def test_bad_numbers_are_refused_before_any_work(tmp_path, monkeypatch, capsys, bad, message):
    def no_data(*a, **kw): raise AssertionError("the data was loaded before the options were checked")
    monkeypatch.setattr(T, 'mtl_dls', no_data)
    assert main(['train', '--log_dir', str(tmp_path), *flags(**bad)]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())   # not even the run folder


@pytest.mark.slow
def test_a_full_disk_names_the_file_and_keeps_the_last_good_checkpoint(glyph_root, tmp_path, monkeypatch):
    # row 12: the disk fills while epoch 2's checkpoints are written
    real_fsync, full = os.fsync, threading.Event()
    def fsync(fd):
        if full.is_set(): raise OSError(errno.ENOSPC, 'No space left on device')
        real_fsync(fd)
    monkeypatch.setattr(fsmtl.files.os, 'fsync', fsync)
    make = T.mtl_learner
    def filling(*a, **kw):
        learn = make(*a, **kw)
        learn.add_cb(type('Fill', (Callback,), dict(after_train=lambda self: full.set() if self.epoch == 1 else None))())
        return learn
    monkeypatch.setattr(T, 'mtl_learner', filling)
    with pytest.raises(OSError, match=r"no space left on .*run while writing (best|last)\.pth.*continue it with --resume"):
        train(**TINY | dict(root=glyph_root, log_dir=tmp_path, run_name='run', progress=False))
    run = tmp_path / 'run'
    assert read_checkpoint(run / 'last.pth')['epoch'] == 1 and read_checkpoint(run / 'best.pth')['epoch'] == 1
    assert pd.read_csv(run / 'history.csv')['epoch'].tolist() == [0]   # never ahead of the checkpoints
    assert not [f for f in run.iterdir() if f.name.endswith('.part')]


def test_checkpoint_errors_say_what_the_file_is(tmp_path, capsys):
    # row 13
    (tmp_path / 'empty.pth').write_bytes(b'')
    # seeded noise: os.urandom's starts as a pickle (0x80) once in 256 runs, which is the case below
    noise = np.random.default_rng(0).bytes(4096)
    assert noise[:1] != b'\x80' and noise[:2] != b'PK'
    (tmp_path / 'noise.pth').write_bytes(noise)
    (tmp_path / 'pickle_noise.pth').write_bytes(b'\x80' + noise[1:])
    backbone, _ = create_backbone('resnet12', channels=(16, 32, 32, 64))
    torch.save(dict(arch='resnet12', arch_kwargs=dict(channels=[8, 16, 16, 32]), size=32, mean=[0.5] * 3, std=[0.5] * 3,
                    backbone=backbone.state_dict()), tmp_path / 'other.pth')
    torch.save(backbone.state_dict(), tmp_path / 'bare.pth')
    def err(name):
        assert main(['test', '--load_path', str(tmp_path / name)]) == 2
        return capsys.readouterr().err
    assert 'the file is empty (0 bytes)' in err('empty.pth')
    assert 'not a file torch.save wrote' in err('noise.pth')
    # noise that starts as torch.save's old pickles do: torch's own reason, on one line
    pickled = err('pickle_noise.pth')
    assert 'Cannot read checkpoint' in pickled and '(4096 bytes)' in pickled and len(pickled.strip().splitlines()) == 1
    other = err('other.pth')
    assert 'layer1.0.conv1.weight: (16, 3, 3, 3) in the file, (8, 3, 3, 3) in the model' in other
    assert 'parameters differ' in other and len(other.splitlines()) <= 7
    assert 'not an fsmtl checkpoint' in err('bare.pth')
