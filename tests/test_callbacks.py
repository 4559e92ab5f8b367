"EpisodicEval inside real fastai fits on glyphs: metrics by name, the trackers that monitor them, lr_find, every."
import math
import warnings

import numpy as np
import pytest
import torch
import fastai.callback.schedule  # noqa: F401 (adds Learner.lr_find)
from fastai.callback.tracker import EarlyStoppingCallback, ReduceLROnPlateau, SaveModelCallback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat

import fsmtl.callbacks as C
from fsmtl.callbacks import EpisodicEval
from fsmtl.data.block import mtl_dls
from fsmtl.evaluate import evaluate
from helpers import Classifier

EPISODES = 12


@pytest.fixture
def learner(glyph_splits, tmp_path):
    def make(*cbs, every=1, shots=5, **kwargs):
        dls = mtl_dls(glyph_splits, meta_batch_size=2, epoch_length=6, val_episodes=EPISODES, test_episodes=EPISODES,
                      device='cpu')
        cb = EpisodicEval(every=every, shots=shots)
        return Learner(dls, Classifier(glyph_splits.train.n_classes), loss_func=CrossEntropyLossFlat(), path=tmp_path,
                       cbs=[cb, *cbs], **kwargs)
    return make


def column(learn, name):
    return [v[learn.recorder.metric_names[1:].index(name)] for v in learn.recorder.values]


@pytest.mark.slow
def test_save_model_keeps_the_best_episodic_acc(learner, tmp_path):
    learn = learner(SaveModelCallback(monitor='episodic_acc', comp=np.greater, fname='best'), shots=(1, 5))
    learn.fit(3, 3e-3)
    names = learn.recorder.metric_names
    assert {'episodic_acc', 'episodic_ci', 'episodic_acc_1shot', 'episodic_ci_1shot'} <= set(names)
    accs = column(learn, 'episodic_acc')
    assert len(accs) == 3 and all(0 <= a <= 1 for a in accs)
    assert len(set(accs)) > 1, "training should move the validation accuracy"
    assert column(learn, 'valid_loss') == [None] * 3   # no loss is computed on novel classes
    # the CI column is 1.96 std / sqrt(n) of the last epoch's per-episode accuracies, by hand
    last = learn.episodic_eval.results
    assert len(last[5].accs) == EPISODES
    assert column(learn, 'episodic_ci')[-1] == pytest.approx(1.96 * np.std(last[5].accs) / math.sqrt(EPISODES))
    assert column(learn, 'episodic_acc_1shot')[-1] == pytest.approx(np.mean(last[1].accs))
    # the file SaveModelCallback kept scores, on the same episodes, the best value the table showed
    fresh = Classifier(learn.dls.splits.train.n_classes, seed=1)
    fresh.load_state_dict(torch.load(tmp_path / 'models' / 'best.pth', weights_only=True))
    again = evaluate(fresh, learn.dls, split='val', shots=5, episodes=EPISODES, progress=False)
    assert again.mean == pytest.approx(max(accs), abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('main', [True, False], ids=['rank0', 'rank1'])
def test_plateau_and_early_stopping_monitor_it_by_name(learner, monkeypatch, capsys, main):
    # a frozen backbone keeps the features, so episodic_acc stays flat and both trackers must act on it
    monkeypatch.setattr(C, 'is_main', lambda: main)
    learn = learner(C.DDPReduceLROnPlateau(monitor='episodic_acc', comp=np.greater, patience=1, factor=10),
                    C.DDPEarlyStopping(monitor='episodic_acc', comp=np.greater, patience=2))
    for p in learn.model.backbone.parameters(): p.requires_grad_(False)
    for m in learn.model.backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d): m.momentum = 0.   # running statistics stay as they are too
    learn.fit(6, 1e-2)
    accs = column(learn, 'episodic_acc')
    assert len(accs) == 3 and len(set(accs)) == 1   # stopped after two epochs without a gain
    assert learn.opt.hypers[-1]['lr'] == pytest.approx(1e-4)   # divided by 10 after each epoch without a gain
    # fastai's messages, from rank 0 only: the other processes act alike in silence
    out = capsys.readouterr().out
    assert (out.count('reducing lr'), out.count('No improvement since epoch')) == ((2, 1) if main else (0, 0)), out
    assert isinstance(learn.ddp_reduce_lr_on_plateau, ReduceLROnPlateau) and isinstance(learn.ddp_early_stopping,
                                                                                         EarlyStoppingCallback)


@pytest.mark.slow
def test_every_and_lr_find(learner, monkeypatch):
    calls = []
    add = C.ProbeScorer.add
    monkeypatch.setattr(C.ProbeScorer, 'add', lambda self, f: (calls.append(len(f)), add(self, f)))
    learn = learner(every=2)
    learn.lr_find(num_it=4, show_plot=False)
    assert calls == []
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        learn.fit(3, 1e-3)
    # the skipped epoch's empty validation is not reported by fastprogress, and no filter outlives it
    assert not [w for w in seen if 'generator is empty' in str(w.message)] and warnings.filters == filters
    accs = column(learn, 'episodic_acc')
    assert math.isnan(accs[0]) and not math.isnan(accs[1]) and not math.isnan(accs[2])   # epochs 2 and the last
    per_pass = 5 * (5 + 15) * EPISODES
    assert sum(calls) == 2 * per_pass and max(calls) <= 256


def test_needs_episodes(glyph_splits):
    dls = mtl_dls(glyph_splits, meta_batch_size=2, epoch_length=2, val_episodes=2, test_episodes=2, device='cpu')
    dls.splits = None
    dls.valid.shots = 1   # too few supports for 5-shot episodes
    learn = Learner(dls, Classifier(glyph_splits.train.n_classes), loss_func=CrossEntropyLossFlat(),
                    cbs=EpisodicEval())
    with pytest.raises(ValueError, match='mtl_dls'): learn.fit(1)
    with pytest.raises(ValueError, match='every'): EpisodicEval(every=0)
