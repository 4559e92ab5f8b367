"`train` on glyphs: it learns, keeps the best checkpoint, resumes exactly, stops on NaN, logs; `fsmtl train`/`test` flags."
import json
import re
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback

import fsmtl.config
import fsmtl.train as T
from fsmtl.checkpoint import read_checkpoint
from fsmtl.classifier import FewShotClassifier
from fsmtl.cli import main
from fsmtl.evaluate import evaluate
from fsmtl.scoring import EvalResult
from fsmtl.config import ALIASES, options
from fsmtl.train import train
from helpers import TEST_SEED, assert_gain

pytestmark = pytest.mark.usefixtures('one_thread')


def small(root, tmp_path, **kw):
    "Options of a short CPU run on glyphs with a small ResNet-12."
    return dict(dict(dataset='glyphs-small', root=str(root), log_dir=str(tmp_path / 'runs'), run_name='run',
                     model_kwargs=dict(channels=(16, 32, 32, 64)), meta_batch_size=2, epoch_length=40,
                     val_epoch_length=20, final_test_epoch_length=40, scheduler='one_cycle', lr=3e-3, max_epochs=3,
                     progress=False, seed=TEST_SEED), **kw)


def column(history, name): return history[name].tolist()


@pytest.fixture(scope='module')
def trained(glyph_root, tmp_path_factory):
    "A short run with the untrained backbone tested on the same episodes."
    tmp = tmp_path_factory.mktemp('trained')
    return train(**small(glyph_root, tmp, baseline=True, max_epochs=4, epoch_length=60, final_test_epoch_length=100)), tmp


@pytest.mark.statistical
@pytest.mark.slow
def test_a_short_run_learns_and_keeps_its_best_checkpoint(trained, glyph_root):
    res, tmp = trained
    # clearly above the untrained backbone on the same episodes
    for s in (1, 5): assert_gain(f'mtl learns, {s}-shot', res.test[s].accs, res.untrained[s].accs)
    accs = column(res.history, 'episodic_acc')
    assert len(accs) == 4 and all(0 < a <= 1 for a in accs)
    best = read_checkpoint(res.run_dir / 'best.pth')
    assert best['epoch'] == int(np.argmax(accs)) + 1 == res.best_epoch
    assert best['value'] == pytest.approx(max(accs))
    # the best file's backbone scores the same validation episodes as the table's best value
    clf = FewShotClassifier.from_checkpoint(res.run_dir / 'best.pth')
    again = evaluate(clf.backbone, res.learner.dls, split='val', shots=5, queries=15, episodes=20, progress=False)
    assert again.mean == pytest.approx(max(accs), abs=1e-6)
    # fsmtl test gives the run's final test numbers, from the same episodes: the first 60 of them, as the same seed draws
    out = T.evaluate_checkpoint(res.run_dir, root=str(glyph_root), test_episodes=60, progress=False)
    for s in (1, 5): assert out[s].accs.tolist() == pytest.approx(res.test[s].accs[:60].tolist())
    assert set(res.test) == {1, 5} and len(res.test[5].accs) == 100
    assert 'test accuracy, mean ± 95% CI:' in str(res) and f"\n{res.test[1]}   untrained backbone: {res.untrained[1]!r}" in str(res)


@pytest.mark.slow
def test_logs_of_a_run(trained):
    res, tmp = trained
    d = res.run_dir
    assert {p.name for p in d.iterdir()} >= {'best.pth', 'last.pth', 'config.json', 'results.json', 'history.csv'}
    assert not list(d.glob('*.part'))
    cfg = json.loads((d / 'config.json').read_text())
    assert cfg['meta_batch_size'] == 2 and cfg['opt'] == 'radam' and cfg['arch'] == 'resnet12'
    results = json.loads((d / 'results.json').read_text())
    assert results['test']['5shot']['mean'] == pytest.approx(res.test[5].mean)
    assert results['test']['1shot']['ci95'] == pytest.approx(res.test[1].ci95)
    csv = pd.read_csv(d / 'history.csv')
    assert len(csv) == 4 and csv['episodic_acc'].tolist() == pytest.approx(column(res.history, 'episodic_acc'))
    events = list((d / 'tensorboard').glob('events.out.tfevents.*'))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert [e.value for e in acc.Scalars('episodic_acc')] == pytest.approx(column(res.history, 'episodic_acc'))


class Interrupt(Callback):
    "Stops the process-like flow of training at the start of epoch `at`, as a crash would."
    def __init__(self, at): self.at = at
    def before_epoch(self):
        if self.epoch == self.at: raise KeyboardInterrupt


@pytest.mark.slow
def test_resume_continues_where_it_stopped(glyph_root, tmp_path, monkeypatch):
    opts = small(glyph_root, tmp_path, scheduler='plateau', decay_patience=1, max_epochs=3, final_test_epoch_length=10,
                 model_kwargs=dict(channels=(8, 16, 16, 32)))
    straight = train(**dict(opts, run_name='straight'))
    make = T.mtl_learner   # train builds every algorithm's learner by mtl_learner
    def interrupted(*a, **kw):
        learn = make(*a, **kw)
        learn.add_cb(Interrupt(1))   # two epochs are left: a resumed run's second epoch must match too
        return learn
    monkeypatch.setattr(T, 'mtl_learner', interrupted)
    with pytest.raises(KeyboardInterrupt): train(**dict(opts, run_name='cut'))
    monkeypatch.setattr(T, 'mtl_learner', make)
    assert read_checkpoint(tmp_path / 'runs' / 'cut' / 'last.pth')['epoch'] == 1
    resumed = train(resume=True, load_path=str(tmp_path / 'runs' / 'cut'), progress=False)
    # the same three epochs as the uninterrupted run: history, learning rates and the final weights
    assert resumed.history.shape == straight.history.shape == (3, len(straight.history.columns))
    pd.testing.assert_frame_equal(resumed.history, straight.history)
    a, b = read_checkpoint(tmp_path / 'runs' / 'cut' / 'last.pth'), read_checkpoint(tmp_path / 'runs' / 'straight' / 'last.pth')
    assert a['lr'] == b['lr'] and a['trackers'] == b['trackers']
    for k in b['backbone']: torch.testing.assert_close(a['backbone'][k], b['backbone'][k], msg=k)
    assert resumed.test[5].accs.tolist() == straight.test[5].accs.tolist()
    csv = pd.read_csv(tmp_path / 'runs' / 'cut' / 'history.csv')
    assert csv['epoch'].tolist() == [0, 1, 2]   # one header, no epoch twice


class Poison(Callback):
    "Makes the head NaN during epoch `at`."
    order = 0
    def __init__(self, at): self.at = at
    def before_batch(self):
        if self.training and self.epoch == self.at:
            with torch.no_grad(): self.learn.model.head.fill_(float('nan'))


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(glyph_root, tmp_path, monkeypatch):
    make = T.mtl_learner
    monkeypatch.setattr(T, 'mtl_learner', lambda *a, **kw: make(*a, **kw).add_cb(Poison(2)))
    opts = small(glyph_root, tmp_path, max_epochs=4, model_kwargs=dict(channels=(8, 16, 16, 32)))
    # epochs counted from 0, as the epoch table counts them; an fp32 run is not told to train in fp32
    with pytest.raises(FloatingPointError, match=r'loss became nan at epoch 2.*last\.pth') as e: train(**opts)
    assert 'fp32' not in str(e.value)
    last = read_checkpoint(tmp_path / 'runs' / 'run' / 'last.pth')
    assert last['epoch'] == 2 and torch.isfinite(last['head']).all()
    assert all(torch.isfinite(v.float()).all() for v in last['backbone'].values())
    assert not list((tmp_path / 'runs' / 'run').glob('*.part'))


@pytest.mark.parametrize('bad,match', [(dict(model='resnet13'), 'resnet12'), (dict(optim='lamb'), 'unknown optimiser'),
                                       (dict(scheduler='cosine'), 'unknown scheduler'), (dict(algorithm='reptile'), 'unknown algorithm'),
                                       (dict(test_method='svm'), 'unknown probe')])
def test_unknown_names_give_clear_errors(glyph_root, tmp_path, bad, match):
    with pytest.raises(ValueError, match=match): train(**small(glyph_root, tmp_path, **bad))


def test_unknown_option_names_the_close_one():
    with pytest.raises(TypeError, match='did you mean meta_batch_size'): train(meta_batchsize=2)


RECIPES = [  # the original's README recipes, with the flags every one of them has
    '--norm_train_features --meta_batch_size 2 --test_shots 5 --dataset mini-imagenet',
    '--norm_train_features --test_shots 1 --dataset mini-imagenet',
    '--norm_train_features --train_queries 35 --meta_batch_size 1 --test_shots 5 --dataset tiered-imagenet',
    '--norm_train_features --train_queries 35 --meta_batch_size 2 --test_shots 1 --dataset tiered-imagenet',
    '--norm_train_features --test_shots 5 --dataset cifarfs',
    '--norm_train_features --train_queries 15 --meta_batch_size 2 --test_shots 1 --dataset cifarfs',
    '--test_shots 5 --dataset fc100',
    '--train_queries 4 --train_shots 1 --meta_batch_size 1 --test_shots 1 --dataset fc100',
]


class Reached(Exception): pass


def _flags(cmd):
    toks = cmd.split()
    return {t: (v if not v.startswith('--') else True) for t, v in zip(toks, toks[1:] + ['--']) if t.startswith('--')}


def test_recipes_table_matches_the_original_readme():
    ours = [_flags(T.recipe_command(r)) for r in T.RECIPES]
    # each keeps the original code's head, so that it reproduces the paper
    assert all(f.pop('--original_head') is True for f in ours)
    assert len(ours) == 8 and all(_flags(r) in ours for r in RECIPES)
    paper = {('mini-imagenet', 1): '59.84 ± 0.22', ('mini-imagenet', 5): '77.72 ± 0.09', ('fc100', 1): '42.4 ± 0.2'}
    assert all(r['paper'] == paper[k] for r in T.RECIPES if (k := (r['dataset'], r['shots'])) in paper)
    assert all(r['options']['test_shots'] == r['shots'] for r in T.RECIPES)


@pytest.mark.parametrize('recipe', RECIPES)
def test_original_recipes_reach_data_loading(recipe, monkeypatch, tmp_path):
    seen = {}
    def dls(name, **kw):
        seen.update(kw, name=name)
        raise Reached
    monkeypatch.setattr(T, 'mtl_dls', dls)
    argv = ['train', '--gpu', '0', '--root', str(tmp_path), '--algorithm', 'mtl', '--log_dir', str(tmp_path)] + recipe.split()
    with warnings.catch_warnings(record=True) as w, pytest.raises(Reached):
        warnings.simplefilter('always')
        main(argv)
    if not torch.cuda.is_available():
        assert seen['device'] == torch.device('cpu') and any('CUDA is not available' in str(x.message) for x in w)
    toks = recipe.split()
    flags = {t: v for t, v in zip(toks, toks[1:] + ['--']) if t.startswith('--') and not v.startswith('--')}
    assert seen['name'] == flags['--dataset'] and seen['root'] == str(tmp_path)
    for flag, key in [('--meta_batch_size', 'meta_batch_size'), ('--test_shots', 'test_shots'),
                      ('--train_queries', 'train_queries'), ('--train_shots', 'train_shots')]:
        assert seen[key] == int(flags[flag]) if flag in flags else seen[key] == options()[key][0]


def test_every_flag_parses_with_underscores_and_hyphens_and_by_its_original_name(monkeypatch):
    got = []
    monkeypatch.setattr(T, 'train', lambda **kw: got.append(kw) or 'done')
    # --test_only is among the flags: the command then tests the checkpoint instead of training
    monkeypatch.setattr(T, 'evaluate_checkpoint', lambda **kw: got.append(kw) or {})
    values = {bool: [], int: ['3'], float: ['0.5'], str: ['x']}
    old = {new: o for o, new in ALIASES.items()}
    for hyphens, original in [(False, False), (True, False), (False, True), (True, True)]:
        argv = ['train']
        for name, (default, _) in options().items():
            if name == 'progress': continue
            flag = '--' + (old[name] if original and name in old else name)
            if hyphens: flag = flag.replace('_', '-')
            if name == 'arch_kwargs': argv += [flag, '{"channels": [8, 16, 16, 32]}']
            elif name == 'pretrained': argv += [flag, '/w.pth']
            elif name == 'precision': argv += ['--fp16'] if original else [flag, 'fp16']
            elif name in ('gpu', 'size', 'num_workers'): argv += [flag, '3']
            else: argv += [flag] + values[type(default) if default is not None else str]
        assert main(argv) == 0
    new, *others = got
    assert all(o == new for o in others[:1]) and set(new) == set(options()) - {'progress', 'test_only'}
    # the original names reach `train` as the flags' new names, but --fp16, which `train` takes as it is
    assert others[1] == others[2] == {**{k: v for k, v in new.items() if k != 'precision'}, 'fp16': True}
    assert new['arch_kwargs'] == {'channels': [8, 16, 16, 32]} and new['pretrained'] == '/w.pth' and new['precision'] == 'fp16'
    assert new['lr'] == 0.5 and new['max_epochs'] == 3 and new['gpu'] == 3 and new['dataset'] == 'x'


def test_original_names_are_aliases_of_train(glyph_root, tmp_path, monkeypatch):
    seen = {}
    def dls(name, **kw):
        seen.update(kw)
        raise Reached
    monkeypatch.setattr(T, 'mtl_dls', dls)
    base = {k: v for k, v in small(glyph_root, tmp_path).items() if k not in ('val_epoch_length', 'final_test_epoch_length')}
    for opts in (dict(val_epoch_length=7, final_test_epoch_length=9), dict(val_episodes=7, test_episodes=9)):
        with pytest.raises(Reached): train(**base, **opts)
        assert seen['val_episodes'] == 7 and seen['test_episodes'] == 9
    with pytest.raises(TypeError, match='give val_episodes or val_epoch_length, not both'):
        train(**base, val_episodes=7, val_epoch_length=7)
    with pytest.raises(ValueError, match='choose fp16 or bf16, not both'): train(fp16=True, bf16=True)
    with pytest.raises(ValueError, match='precision must be fp32, fp16 or bf16'): train(precision='fp8')


@pytest.mark.slow
def test_fsmtl_test_and_train_commands(trained, glyph_root, capsys):
    res, tmp = trained
    assert main(['test', '--load-path', str(res.run_dir / 'best.pth'), '--root', str(glyph_root),
                 '--final_test_epoch_length', '40']) == 0
    out = capsys.readouterr().out
    # the first 40 of the same seed's episodes are the run's first 40
    assert f"5-way 5-shot: {EvalResult(res.test[5].accs[:40])!r} (40 episodes)" in out
    assert f"5-way 1-shot: {EvalResult(res.test[1].accs[:40])!r} (40 episodes)" in out
    assert main(['train', '--root', str(glyph_root), '--optim', 'lamb']) == 2
    assert 'unknown optimiser' in capsys.readouterr().err
    assert main(['test', '--load_path', str(tmp / 'nothing.pth')]) == 2
    assert 'No checkpoint file' in capsys.readouterr().err
    # --test_only of fsmtl train is fsmtl test
    assert main(['train', '--test_only', '--load_path', str(res.run_dir), '--root', str(glyph_root),
                 '--final_test_epoch_length', '40']) == 0
    assert f"5-way 5-shot: {EvalResult(res.test[5].accs[:40])!r} (40 episodes)" in capsys.readouterr().out


@pytest.mark.slow
def test_testing_needs_no_training_optimiser(trained, glyph_root, monkeypatch, tmp_path):
    # a run trained with torch-optimizer's adamp is tested where that package is missing
    res, _ = trained
    st = read_checkpoint(res.run_dir / 'best.pth')
    st['config']['opt'] = 'adamp'
    torch.save(st, tmp_path / 'adamp.pth')
    def missing(name): raise ImportError(f"no {name}")
    monkeypatch.setattr(fsmtl.config, 'get_opt', missing)   # the fit's config, which a test does not make
    out = T.evaluate_checkpoint(tmp_path / 'adamp.pth', root=str(glyph_root), test_episodes=40, progress=False)
    assert out[5].accs.tolist() == pytest.approx(res.test[5].accs[:40].tolist())


def test_wandb_mode(monkeypatch, tmp_path):
    from fsmtl.runlog import wandb_mode
    for k in ('WANDB_MODE', 'WANDB_API_KEY'): monkeypatch.delenv(k, raising=False)
    netrc = tmp_path / 'netrc'
    netrc.write_text('machine example.org login a password b\n')
    monkeypatch.setenv('NETRC', str(netrc))
    assert wandb_mode() == 'offline'
    netrc.write_text('machine api.wandb.ai login user password secret\n')
    assert wandb_mode() == 'online'
    monkeypatch.setenv('WANDB_MODE', 'disabled')
    assert wandb_mode() == 'disabled'
    monkeypatch.delenv('WANDB_MODE')
    monkeypatch.setenv('NETRC', str(tmp_path / 'none'))
    monkeypatch.setenv('WANDB_API_KEY', 'x' * 40)
    assert wandb_mode() == 'online'


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wandb_logs_offline_when_not_logged_in(glyph_root, tmp_path, monkeypatch):
    for k in ('WANDB_MODE', 'WANDB_API_KEY'): monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv('NETRC', str(tmp_path / 'no-netrc'))
    monkeypatch.setenv('WANDB_SILENT', 'true')
    monkeypatch.chdir(tmp_path)   # a relative log_dir is relative to where the run starts, not to the data
    res = train(**small(glyph_root, tmp_path, max_epochs=2, wandb=True, final_test_epoch_length=10, log_dir='logs',
                        model_kwargs=dict(channels=(8, 16, 16, 32))))
    assert res.run_dir == tmp_path / 'logs' / 'run' and (res.run_dir / 'history.csv').is_file()
    runs = list((res.run_dir / 'wandb').glob('offline-run-*'))
    assert len(runs) == 1
    run_file = next(runs[0].glob('*.wandb'))
    for _ in range(40):   # the wandb service may still be writing the run's last records
        data = run_file.read_bytes()
        if b'test_acc_5shot' in data: break
        time.sleep(0.5)
    def logged(key):
        "The values logged under `key`: in the run file each is a protobuf string field (tag 0x82 0x01, length) of JSON."
        return [float(data[m.end():m.end() + m.group(1)[0]]) for m in re.finditer(re.escape(key) + rb'\x82\x01(.)', data, re.S)]
    # each epoch's values go into the run's history and its summary
    assert sorted(set(logged(b'episodic_acc'))) == pytest.approx(sorted(set(res.history['episodic_acc'])))
    assert sorted(set(logged(b'test_acc_5shot'))) == pytest.approx([res.test[5].mean])


@pytest.mark.slow
def test_step_schedule_through_train(glyph_root, tmp_path):
    res = train(**small(glyph_root, tmp_path, scheduler='step', decay_patience=1, decay_rate=0.1, max_epochs=2, lr=1e-3,
                        epoch_length=8, val_epoch_length=5, final_test_epoch_length=5, no_log=True,
                        model_kwargs=dict(channels=(8, 16, 16, 32))))
    lrs = res.learner.recorder.lrs   # one a training batch: 4 batches of 2 tasks an epoch
    assert lrs == pytest.approx([1e-3] * 4 + [1e-4] * 4)
    assert not (tmp_path / 'runs' / 'run' / 'history.csv').exists()   # no_log
    assert (tmp_path / 'runs' / 'run' / 'best.pth').exists()          # checkpoints are still written


@pytest.mark.slow
def test_episodes_are_drawn_once(glyph_root, tmp_path, monkeypatch):
    # validation, the untrained baseline and the final test all score the EpisodeDLs mtl_dls made: no other is built
    from fsmtl.data.tasks import EpisodeDL
    made, init = [], EpisodeDL.__init__
    monkeypatch.setattr(EpisodeDL, '__init__', lambda self, *a, **k: (made.append(k.get('n')), init(self, *a, **k))[-1])
    res = train(**small(glyph_root, tmp_path, baseline=True, max_epochs=2, epoch_length=8))
    assert made == [20, 40]   # val_epoch_length, final_test_epoch_length
    dls = res.learner.dls
    assert res.learner.episodic_eval.results[5].episodes == len(dls.valid.episodes) == 20
    # asking for other episodes than the loader's draws them: the first 10 of the same seed's are the loader's first 10
    few = res.learner.evaluate(episodes=10, progress=False)
    assert made == [20, 40, 10]
    for s in (1, 5): np.testing.assert_array_equal(few[s].accs, res.test[s].accs[:10])
