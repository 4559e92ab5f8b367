"Two processes on gloo, launched by torchrun as a user launches them: evaluation, a training step, runs and faults equal to one process."
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import torch

import fsmtl.train
from fsmtl.checkpoint import read_checkpoint
from fsmtl.cli import main
from fsmtl.data.block import mtl_dls
from fsmtl.evaluate import evaluate
from fsmtl.heads import MTLModel, MultiTaskLoss
from fsmtl.models import create_backbone
from fsmtl.train import evaluate_checkpoint
from test_faults import TINY, env, finish, flags, rows, same_run
import ddp_worker as W

pytestmark = [pytest.mark.usefixtures('one_thread'), pytest.mark.slow]
HERE = Path(__file__).parent


def torchrun(*args, timeout=None):
    "Start `torchrun --standalone --nproc_per_node 2 args` in a session of its own (so all its processes can be killed)."
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), start_new_session=True)


def fsmtl_run(*args): return torchrun('-m', 'fsmtl', *args)


def kill_all(p):
    "SIGKILL the launch `p` and every process under it, as a lost machine ends them."
    # torchrun starts each worker in a session of its own, out of the launcher's process group
    procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    for q in procs:
        try: q.kill()
        except psutil.NoSuchProcess: pass
    p.wait()


def ended(p, timeout):
    "`finish(p)`, or kill all of `p`'s processes and fail when it hangs past `timeout` seconds."
    try: return finish(p, timeout)
    except subprocess.TimeoutExpired:
        kill_all(p)
        pytest.fail(f"the launch still ran after {timeout} s: {finish(p)[1][-3000:]}")


@pytest.fixture(scope='module')
def parts(glyph_root, tmp_path_factory):
    "What each of two processes of tests/ddp_worker.py saw: per-episode accuracies, the training step's batches and weights."
    out = tmp_path_factory.mktemp('ddp-parts')
    rc, log = ended(torchrun(str(HERE / 'ddp_worker.py'), 'parts', str(out), str(glyph_root)), timeout=120)
    assert rc == 0, log[-3000:]
    return [dict(torch.load(out / f'rank{r}.pt', weights_only=False), left=(out / f'left{r}').read_text()) for r in (0, 1)]


def test_each_process_leaves_its_group_before_the_interpreter_ends(parts):
    "init_distributed's exit handler: gloo's threads left to the interpreter's teardown abort a finished run now and then."
    assert [p['left'] for p in parts] == ['True', 'True']


def test_episodic_accuracy_of_two_processes_is_one_process_s_episode_by_episode(parts, glyph_splits):
    torch.manual_seed(0)
    backbone, _ = create_backbone('resnet12', channels=W.CHANNELS)
    one = evaluate(backbone, glyph_splits, progress=False, **W.EVAL)
    for p in parts:
        for s, r in one.items():
            assert len(p['accs'][s]) == W.EVAL['episodes']
            np.testing.assert_array_equal(p['accs'][s], r.accs)   # exactly, episode by episode, on both ranks
    # with test-time fine-tuning: each rank tunes its share of the episodes, each with the seed one process gives it
    tuned = evaluate(backbone, glyph_splits, progress=False, **W.TUNED)
    for p in parts:
        for s, r in tuned.items(): np.testing.assert_allclose(p['tuned'][s], r.accs, atol=1e-6)
    assert [p['tuned']['copies'] for p in parts] == [3 * 2, 2 * 2]   # episodes x shot counts, on each rank


@pytest.mark.parametrize('algorithm', W.NATIVE_ALGORITHMS)
def test_native_test_of_two_processes_is_one_process_s_episode_by_episode(parts, glyph_splits, algorithm):
    torch.manual_seed(0)
    backbone, _ = create_backbone('resnet12', channels=W.CHANNELS)
    one = evaluate(W.native_model(algorithm, backbone), glyph_splits, progress=False, **W.NATIVE)
    assert [p['native'][algorithm]['episodes'] for p in parts] == [6, 5]   # each rank its share of the 11 episodes
    for p in parts:
        for s, r in one.items():
            assert len(p['native'][algorithm][s]) == W.NATIVE['episodes']
            np.testing.assert_array_equal(p['native'][algorithm][s], r.accs)   # exactly, episode by episode, on both ranks
    assert 0 < one[5].mean < 1


def test_one_step_on_two_processes_is_one_process_step_on_all_the_tasks(parts, glyph_splits):
    (x0, y0), = parts[0]['batches']
    (x1, y1), = parts[1]['batches']
    per_task = W.STEP['train_ways'] * (W.STEP['train_shots'] + W.STEP['train_queries'])
    assert len(y0) == len(y1) == per_task * W.STEP['meta_batch_size'] // 2   # half the tasks each
    assert not torch.equal(y0, y1)                                           # each rank its own tasks
    assert all(torch.equal(parts[0]['init'][k], v) for k, v in parts[1]['init'].items())
    # one process: the same model, each half's gradient (BatchNorm statistics of each half, as each rank has) averaged
    model = MTLModel(create_backbone('resnet12', channels=W.CHANNELS, drop_rate=0.)[0], W.CHANNELS[-1],
                     glyph_splits.train.n_classes, W.STEP['train_ways'])
    model.load_state_dict(parts[0]['init'])
    loss = MultiTaskLoss(W.STEP['train_ways'], W.STEP['train_shots'] + W.STEP['train_queries'])
    params = dict(model.named_parameters())
    halves = [(loss(model(x), y), loss.task_logits(model(x).detach(), y)) for x, y in ((x0, y0), (x1, y1))]
    grads = [torch.autograd.grad(l, list(params.values())) for l, _ in halves]
    # what every rank records is of all the step's tasks: the mean loss and the task accuracy over both halves
    hist = parts[0]['history']
    assert parts[1]['history'] == hist
    assert hist['train_loss'] == [pytest.approx(float(sum(l.detach() for l, _ in halves)) / 2, rel=1e-5)]
    correct = sum(int((logits.argmax(1) == y).sum()) for _, (logits, y) in halves)
    assert hist['task_acc'] == [correct / (len(y0) + len(y1))]
    expected = {k: p.detach() - W.LR * (g0 + g1) / 2 for (k, p), g0, g1 in zip(params.items(), *grads)}
    f0, f1 = parts[0]['final'], parts[1]['final']
    for k in f0: assert torch.equal(f0[k], f1[k]), k   # parameters and buffers identical on both ranks
    for k, v in expected.items():
        assert not torch.equal(v, parts[0]['init'][k]), k   # the step moved every parameter
        torch.testing.assert_close(f0[k], v, rtol=1e-5, atol=1e-6)


def test_a_frozen_epoch_then_a_thawed_one_keep_the_ranks_equal(parts):
    t0, t1, before = parts[0]['thawed'], parts[1]['thawed'], parts[0]['final']
    for k in t0: assert torch.equal(t0[k], t1[k]), k
    assert not torch.equal(t0['backbone.layer1.0.conv1.weight'], before['backbone.layer1.0.conv1.weight'])


def test_episodic_acc_of_the_step_is_one_process_s_on_its_weights(parts, glyph_splits):
    model = MTLModel(create_backbone('resnet12', channels=W.CHANNELS, drop_rate=0.)[0], W.CHANNELS[-1],
                     glyph_splits.train.n_classes, W.STEP['train_ways'])
    model.load_state_dict(parts[0]['final'])
    one = evaluate(model, glyph_splits, split='val', ways=5, shots=1, queries=W.STEP['test_queries'],
                   episodes=W.STEP['val_episodes'], seed=0, progress=False)
    for p in parts: assert p['history']['episodic_acc'] == [pytest.approx(one.mean, abs=1e-7)]


OPTS = dict(TINY, meta_batch_size=4)


@pytest.fixture(scope='module')
def straight(glyph_root, tmp_path_factory):
    "An uninterrupted 2-process run from the shell: the reference of the interrupted one."
    runs = tmp_path_factory.mktemp('ddp') / 'runs'
    opts = dict(OPTS, root=glyph_root, log_dir=runs)
    rc, out = ended(fsmtl_run('train', *flags(**opts, run_name='straight')), timeout=180)
    assert rc == 0, out[-3000:]
    return opts, runs, out


def test_two_processes_write_one_run_whose_test_is_one_process_s(straight):
    opts, runs, out = straight
    run = runs / 'straight'
    assert sorted(p.name for p in run.iterdir()) == ['.lock', 'best.pth', 'config.json', 'history.csv', 'last.pth',
                                                     'results.json', 'tensorboard']
    assert list(pd.read_csv(run / 'history.csv')['epoch']) == list(range(OPTS['max_epochs']))
    assert out.count('best epoch') == 1   # rank 0 alone prints the result
    assert 'find_unused_parameters' not in out   # DDP looks for unused parameters only when some may be
    assert len(read_checkpoint(run / 'last.pth')['rng_ranks']) == 2
    test = json.loads((run / 'results.json').read_text())['test']
    one = evaluate_checkpoint(run / 'best.pth', root=opts['root'], progress=False)
    assert test == {f'{s}shot': dict(mean=r.mean, ci95=r.ci95, episodes=len(r.accs)) for s, r in one.items()}


def test_kill_9_after_an_epoch_then_resume_on_two_processes(straight):
    opts, runs, _ = straight
    p = fsmtl_run('train', *flags(**opts, run_name='cut'))
    t0 = time.time()
    while rows(runs / 'cut') < 1:
        assert p.poll() is None and time.time() - t0 < 120, finish(p)[1][-3000:]
        time.sleep(0.02)
    kill_all(p)   # the launcher and both processes
    assert read_checkpoint(runs / 'cut' / 'last.pth')['epoch'] == 1
    rc, out = ended(fsmtl_run('train', '--resume', '--load_path', str(runs / 'cut')), timeout=180)
    assert rc == 0, out[-3000:]
    same_run(runs / 'cut', runs / 'straight')


def test_meta_batch_size_that_does_not_divide_ends_both_processes(glyph_root, tmp_path):
    t0 = time.time()
    rc, out = ended(fsmtl_run('train', *flags(**dict(OPTS, meta_batch_size=3), root=glyph_root, log_dir=tmp_path)), timeout=60)
    assert rc != 0 and time.time() - t0 < 60
    for r in (0, 1):
        assert (f"fsmtl train (process {r} of 2): meta_batch_size 3 is the number of tasks a step over all 2 processes, "
                "so it must be a multiple of 2: use 2 or 4") in out
    assert not list(tmp_path.iterdir())


def test_a_process_that_fails_ends_the_run_with_its_error(glyph_root, tmp_path):
    t0 = time.time()
    rc, out = ended(torchrun(str(HERE / 'ddp_worker.py'), 'fail', str(tmp_path), str(glyph_root)), timeout=90)
    assert rc != 0 and time.time() - t0 < 90
    assert "fsmtl train (process 1 of 2): rank 1 cannot read the images of its task" in out
    # rank 0 either reports the lost peer, or torchrun ends it first when rank 1 exits: both end the run, no hang
    assert ("fsmtl train (process 0 of 2): another process of the run stopped; its own message says why" in out
            or 'SIGTERM' in out or 'elastic/errors.html' in out), out[-3000:]


def test_resuming_on_another_number_of_processes_is_refused_before_any_work(straight, monkeypatch, capsys):
    def no_data(*a, **kw): raise AssertionError("the data was loaded before the processes were counted")
    monkeypatch.setattr(fsmtl.train, 'mtl_dls', no_data)
    assert main(['train', '--resume', '--load_path', str(straight[1] / 'straight')]) == 2
    assert ("fsmtl train: this run was trained on 2 process(es) and is resumed on 1: resume it on 2 (torchrun "
            "--nproc_per_node 2)") in capsys.readouterr().err
