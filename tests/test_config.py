"The options: one typed config a phase, checked where it is made; the original names as aliases; a run of main's read back."
import json
import shutil
from pathlib import Path

import pytest

import fsmtl.algorithms as A
from fsmtl import config as C   # its TestConfig is no test class
from fsmtl.config import ALIASES, DataConfig, FitConfig, ModelConfig, RunConfig, options, option_values, run_config
from fsmtl.learner import _may_leave_unused
from fsmtl.train import evaluate_checkpoint, train
from helpers import TEST_SEED

pytestmark = pytest.mark.usefixtures('one_thread')
MAIN = Path(__file__).parent / 'data' / 'main_run'   # written by main's code at 979c717: tests/data/make_main_config.py


def test_a_config_json_of_main_reads_into_the_typed_configs():
    old = json.loads((MAIN / 'config.json').read_text())
    cfg = run_config({}, old)
    assert isinstance(cfg.data, DataConfig) and isinstance(cfg.fit, FitConfig) and isinstance(cfg.test, C.TestConfig)
    assert (cfg.model.arch, cfg.model.arch_kwargs, cfg.fit.opt, cfg.fit.wd) == ('resnet12', {'channels': [8] * 4}, 'adam', 1e-4)
    assert (cfg.data.val_episodes, cfg.test.test_episodes, cfg.fit.precision) == (3, 5, 'fp32')
    assert cfg.data.seed == 2 and cfg.model.options['norm_train_features'] is True and cfg.model.algo.norm_train_features
    # every value, under its new name
    new = cfg.to_dict()
    for k, v in old.items():
        if k in ('fp16', 'bf16'): assert new['precision'] == 'fp32' and not v
        else: assert new[ALIASES.get(k, k)] == v, k
    assert set(new) == {ALIASES.get(k, k) for k in old} - {'fp16', 'bf16'} | {'precision', 'resumed'}
    # and the new config.json reads back the same
    assert run_config({}, json.loads(json.dumps(new))) == cfg


def test_a_run_of_main_is_tested_and_resumed_as_main_did(glyph_root, tmp_path):
    want = json.loads((MAIN / 'expected.json').read_text())
    got = evaluate_checkpoint(MAIN / 'last.pth', root=str(glyph_root), progress=False)
    for s in (1, 5): assert got[s].accs.tolist() == pytest.approx(want['test'][str(s)], abs=1e-6)
    run = shutil.copytree(MAIN, tmp_path / 'main')
    res = train(resume=True, load_path=str(run), root=str(glyph_root), max_epochs=2, progress=False)
    for s in (1, 5): assert res.test[s].accs.tolist() == pytest.approx(want['resumed_test'][str(s)], abs=1e-6)
    assert res.history['episodic_acc'].tolist() == pytest.approx(want['resumed_history']['episodic_acc'], abs=1e-6)
    cfg = json.loads((run / 'config.json').read_text())
    assert cfg['opt'] == 'adam' and cfg['resumed'][0]['changed']['max_epochs'] == [1, 2]


@pytest.mark.parametrize('make,message', [
    (lambda: DataConfig(val_episodes=0), 'val_episodes (val_epoch_length) must be at least 1, got 0'),
    (lambda: DataConfig(epoch_length=2, meta_batch_size=3), 'epoch_length (2 tasks) is less than one batch'),
    (lambda: DataConfig(size=7.5), 'size must be a finite number, got 7.5'),
    (lambda: FitConfig(lr=-1.), 'lr must be above 0'),
    (lambda: FitConfig(opt='lamb'), 'unknown optimiser'),
    (lambda: FitConfig(precision='fp8'), 'precision must be fp32, fp16 or bf16'),
    (lambda: C.TestConfig(test_l2=0), 'test_l2 must be above 0'),
    (lambda: ModelConfig(algorithm='reptile'), 'unknown algorithm'),
    (lambda: ModelConfig(arch_kwargs=[1]), 'model_kwargs must be keyword arguments'),
    (lambda: RunConfig(model=ModelConfig('protonet'), data=DataConfig(train_queries=0)), 'train_queries'),
    (lambda: RunConfig(test=C.TestConfig(test_method='native')), 'native is a meta-learner')])
def test_each_config_checks_itself_when_made(make, message):
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')): make()


def test_options_and_their_aliases():
    names = options()
    assert {'arch', 'opt', 'wd', 'val_episodes', 'test_episodes', 'precision', 'adaptation_lr'} <= set(names)
    assert not set(ALIASES) & set(names) and 'fp16' not in names
    assert option_values(dict(optim='sgd', fp16=True))['opt'] == 'sgd' and option_values(dict(bf16=True))['precision'] == 'bf16'
    with pytest.raises(TypeError, match='did you mean val_episodes'): option_values(dict(val_epsodes=3))


def test_the_algorithm_is_checked_once_a_run(glyph_root, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(A.ProtoNet, 'needs', (lambda: calls.append(1),))
    res = train(dataset='glyphs-small', root=str(glyph_root), log_dir=str(tmp_path), run_name='p', algorithm='protonet',
                model_kwargs=dict(channels=(8, 8, 8, 8)), meta_batch_size=1, epoch_length=1, val_episodes=1, test_episodes=1,
                test_queries=2, max_epochs=1, no_log=True, progress=False, seed=TEST_SEED)
    assert calls == [1]
    assert _may_leave_unused(res.learner) and res.learner.algorithm is res.config.model.algo


def test_meta_learners_may_leave_parameters_unused():
    assert {n for n, cls in A.ALGORITHMS.items() if cls.may_leave_unused} == {'protonet', 'metaoptnet', 'r2d2', 'maml', 'anil'}
