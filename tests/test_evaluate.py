"Tests of the episodic evaluation: CI arithmetic, the episodes it draws, accuracies of models with known features, bounded memory."
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch import nn

import fsmtl.scoring as S
from fsmtl.data.block import episode_dl, mtl_dls
from fsmtl.evaluate import evaluate
from fsmtl.scoring import EvalResult, EvalResults, ProbeScorer, ci95, score_episodes
from fsmtl.probe import LogisticProbe
from helpers import coded_splits

MEAN, STD = torch.tensor([.4, .5, .6]), torch.tensor([.2, .25, .3])   # coded_splits' normalisation
SMALL = dict(meta_batch_size=2, epoch_length=4, device='cpu', augment=False)


pytestmark = pytest.mark.usefixtures('one_thread')


# ---------------------------------------------------------------- CI and results

def test_ci95_by_hand():
    accs = [0.8, 0.6, 1.0, 0.7]
    # mean .775; deviations .025 -.175 .225 -.075; variance (.000625 + .030625 + .050625 + .005625) / 4 = .021875
    want = 1.96 * 0.021875 ** 0.5 / 2
    assert ci95(accs) == pytest.approx(want, rel=1e-12) and want == pytest.approx(0.144944, abs=1e-6)
    assert ci95([0., 1.]) == pytest.approx(1.96 * 0.5 / 2 ** 0.5)      # ddof=0: not 1.96 * 0.7071 / 1.4142
    a = np.random.default_rng(0).uniform(size=2000)
    assert ci95(a) == pytest.approx(1.96 * np.std(a) / np.sqrt(2000), rel=1e-12)
    assert ci95(np.full(10, .3)) == pytest.approx(0, abs=1e-15)


def test_eval_result_and_repr():
    r = EvalResult(np.array([0.8, 0.6, 1.0, 0.7]), ways=5, shots=1, queries=15)
    assert r.mean == pytest.approx(0.775) and r.ci95 == pytest.approx(0.144944, abs=1e-6) and r.episodes == 4
    assert repr(r) == '77.50 ± 14.49%'
    assert str(r) == '5-way 1-shot: 77.50 ± 14.49% (4 episodes)'
    # 2000 episodes: 1555 at 0.8, 445 at 0.6 -> mean 0.7555, std 0.2 * sqrt(p(1-p)) = 0.083142..., ci 0.0036438...
    r5 = EvalResult(np.r_[np.full(1555, .8), np.full(445, .6)], ways=5, shots=5)
    assert repr(r5) == '75.55 ± 0.36%'
    assert repr(EvalResult(np.full(3, 2 / 3))) == '66.67 ± 0.00%'
    both = EvalResults({1: r, 5: r5})
    assert repr(both).split('\n') == ['5-way 1-shot: 77.50 ± 14.49% (4 episodes)', '5-way 5-shot: 75.55 ± 0.36% (2000 episodes)']


# ---------------------------------------------------------------- episodes

@pytest.mark.parametrize('ways,shots,queries', [(5, 5, 4), (3, 2, 6)])
def test_episode_dl_draws_mtl_dls_episodes(ways, shots, queries):
    sp = coded_splits()
    dls = mtl_dls(sp, test_ways=ways, test_shots=(1, shots), test_queries=queries, val_episodes=6, test_episodes=9,
                  seed=3, final_shots=1, **SMALL)
    test = episode_dl(sp, 'test', ways, shots, queries, n=9, seed=3, device='cpu')
    assert test.episodes.shape == (9, ways * (shots + queries))
    assert np.array_equal(test.episodes, dls[2].episodes)
    for split in ('val', 'valid'):
        assert np.array_equal(episode_dl(sp, split, ways, shots, queries, n=6, seed=3, device='cpu').episodes, dls.valid.episodes)
    # the batches themselves: the same images, normalised alike, the same global class ids
    for (x, y), (x2, y2) in zip(test, dls[2]):
        assert torch.equal(x.as_subclass(torch.Tensor), x2.as_subclass(torch.Tensor))
        assert torch.equal(y.as_subclass(torch.Tensor), y2.as_subclass(torch.Tensor))
    assert not np.array_equal(episode_dl(sp, 'test', ways, shots, queries, n=9, seed=4, device='cpu').episodes, test.episodes)
    # by default the test episodes also hold the final test's 5 shots; an evaluation batch holds up to 256 images
    dls = mtl_dls(sp, test_ways=ways, test_shots=shots, test_queries=queries, val_episodes=6, test_episodes=9, seed=3, **SMALL)
    assert (dls.valid.shots, dls[2].shots, dls.final_shots) == (shots, 5, tuple(sorted({1, 5, shots})))
    assert np.array_equal(dls[2].episodes, episode_dl(sp, 'test', ways, 5, queries, n=9, seed=3, device='cpu').episodes)
    assert dls[2].bs == 256 // (ways * (5 + queries)) and dls.valid.bs == 256 // (ways * (shots + queries))


# ---------------------------------------------------------------- models whose features are known

def decode(x):
    "The (split, class, index) code of pixel (0, 0) of normalised coded images."
    return (x[:, :, 0, 0].as_subclass(torch.Tensor) * STD + MEAN).mul(255).round().long()


class CodeNet(nn.Module):
    "A backbone whose feature for image i of a split is row i of `table`, read from the image's code; records its calls."
    def __init__(self, table):
        super().__init__()
        self.register_buffer('table', torch.as_tensor(table, dtype=torch.float32))
        self.w = nn.Parameter(torch.ones(1))   # a parameter, so that a forward pass under autograd would require grad
        self.calls = []
        self.register_forward_hook(lambda m, inp, out: m.calls.append(dict(
            n=len(inp[0]), training=m.training, grad=torch.is_grad_enabled(), in_grad=inp[0].requires_grad,
            out_grad=out.requires_grad)))

    def forward(self, x): return self.table[decode(x)[:, 2]] * self.w


class WithHead(nn.Module):
    "A model with a `backbone`, whose head the evaluation must not use."
    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(backbone.table.shape[1], 3)
    def forward(self, x): raise AssertionError("the evaluation called the whole model, not its backbone")


def tables(sp, split='test', D=16, seed=0):
    "Feature tables of `split`'s images: 'perfect' (own class one-hot + small noise), 'constant', 'noisy' (classes overlap)."
    labels = sp[split].labels
    assert len(labels) <= 256   # the code's index is i % 256
    rng = np.random.default_rng(seed)
    onehot = np.eye(D)[labels]
    return dict(perfect=onehot + 0.05 * rng.normal(size=onehot.shape),
                constant=np.tile(rng.normal(size=D), (len(labels), 1)),
                noisy=0.8 * onehot + rng.normal(size=onehot.shape) / np.sqrt(D))


def reference_accs(table, episodes, ways, shots, queries, s, probe):
    "Per-episode accuracy computed here: numpy L2-normalised features, then scikit-learn (tight) or numpy prototypes."
    f = table[episodes.reshape(len(episodes), ways, shots + queries)]
    f = f / np.linalg.norm(f, axis=-1, keepdims=True)
    sup, qry = f[:, :, :s].reshape(len(f), ways * s, -1), f[:, :, shots:].reshape(len(f), ways * queries, -1)
    ys, yq = np.repeat(np.arange(ways), s), np.repeat(np.arange(ways), queries)
    accs = []
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter('error')
        for a, q in zip(sup, qry):
            if probe == 'proto':
                p = a.reshape(ways, s, -1).mean(1)
                pred = (q @ (p / np.linalg.norm(p, axis=-1, keepdims=True)).T).argmax(1)
            else:
                pred = LogisticRegression(C=3, solver='lbfgs', max_iter=1000, tol=1e-10).fit(a, ys).predict(q)
            accs.append((pred == yq).mean())
    return np.array(accs)


@pytest.fixture(scope='module')
def sp(): return coded_splits()


@pytest.mark.parametrize('probe', ['logistic', 'proto', 'sklearn'])
def test_perfect_features_score_100(sp, probe):
    r = evaluate(CodeNet(tables(sp)['perfect']), sp, episodes=12, probe=probe, progress=False)
    assert isinstance(r, EvalResults) and list(r) == [1, 5]
    for s in (1, 5):
        assert isinstance(r[s], EvalResult) and (r[s].ways, r[s].shots, r[s].queries) == (5, s, 15)
        assert r[s].accs.shape == (12,) and (r[s].accs == 1).all() and r[s].ci95 == 0


@pytest.mark.parametrize('probe', ['logistic', 'proto'])
def test_constant_features_score_chance_exactly(sp, probe):
    # one prediction for every query: exactly 1/ways of an episode's balanced queries are right, whatever it is
    r = evaluate(CodeNet(tables(sp)['constant']), sp, ways=4, shots=3, queries=6, episodes=10, probe=probe, progress=False)
    assert isinstance(r, EvalResult) and r.shots == 3 and r.ways == 4
    assert np.array_equal(r.accs, np.full(10, 0.25))


@pytest.mark.parametrize('probe', ['logistic', 'proto'])
def test_accuracy_matches_a_computation_by_hand(sp, probe):
    table = tables(sp)['noisy']
    r = evaluate(CodeNet(table), sp, episodes=24, seed=5, probe=probe, progress=False)
    # the episodes from mtl_dls, built independently of evaluate
    eps = mtl_dls(sp, test_shots=5, test_queries=15, test_episodes=24, seed=5, **SMALL)[2].episodes
    for s in (1, 5):
        ref = reference_accs(table, eps, 5, 5, 15, s, probe)
        assert 0.3 < ref.mean() < 0.95                               # mistakes to get right, and successes
        diff = np.abs(r[s].accs - ref)                               # accs are float32
        if probe == 'proto': assert (diff < 1e-6).all()
        else:
            assert (diff <= 1 / 75 + 1e-6).all() and (diff < 1e-6).mean() >= 0.95
            assert abs(r[s].mean - ref.mean()) <= 1e-3
        assert r[s].ci95 == pytest.approx(1.96 * ref.std() / np.sqrt(24), abs=2e-3)
    assert r[5].mean > r[1].mean


def test_one_shot_is_the_first_support_of_each_class(sp):
    table = tables(sp)['noisy']
    model = CodeNet(table)
    r = evaluate(model, sp, shots=(1, 5), episodes=20, seed=2, progress=False)
    one = evaluate(model, sp, shots=1, episodes=20, seed=2, progress=False)
    dl = episode_dl(sp, 'test', 5, 5, 15, n=20, seed=2, device='cpu')
    f = F.normalize(torch.as_tensor(table, dtype=torch.float32), dim=-1)[torch.from_numpy(dl.episodes)].view(20, 5, 20, -1)
    pred = LogisticProbe().fit(f[:, :, 0], torch.arange(5).expand(20, -1)).predict(f[:, :, 5:].flatten(1, 2))
    by_hand = (pred == torch.arange(5).repeat_interleave(15)).float().mean(1).numpy()
    np.testing.assert_allclose(r[1].accs, by_hand, atol=1e-6)
    # shots=1 alone draws 1-shot episodes: other images, but from the same seed; still scored alike
    assert isinstance(one, EvalResult) and one.accs.shape == (20,)
    dl1 = episode_dl(sp, 'test', 5, 1, 15, n=20, seed=2, device='cpu')
    f1 = F.normalize(torch.as_tensor(table, dtype=torch.float32), dim=-1)[torch.from_numpy(dl1.episodes)].view(20, 5, 16, -1)
    pred1 = LogisticProbe().fit(f1[:, :, 0], torch.arange(5).expand(20, -1)).predict(f1[:, :, 1:].flatten(1, 2))
    np.testing.assert_allclose(one.accs, (pred1 == torch.arange(5).repeat_interleave(15)).float().mean(1).numpy(), atol=1e-6)


# ---------------------------------------------------------------- bounded memory

class ProbeRows:
    "Wraps `get_probe`: records the feature rows (episodes x images) each probe is given to fit and to predict."
    def __init__(self, get_probe):
        self.get_probe, self.rows = get_probe, []
    def __call__(self, *args, **kwargs):
        probe, rows = self.get_probe(*args, **kwargs), self.rows
        fit, predict = probe.fit, probe.predict
        def fit_(x, y): rows.append(('fit', x.shape[0] * x.shape[1], x.requires_grad)); return fit(x, y)
        def predict_(x): rows.append(('predict', x.shape[0] * x.shape[1], x.requires_grad)); return predict(x)
        probe.fit, probe.predict = fit_, predict_
        return probe


GROUP = 300


def run_recorded(monkeypatch, model, sp, **kwargs):
    "evaluate() with a forward hook on the backbone and the probes recorded; features grouped by GROUP rows."
    rec = ProbeRows(S.get_probe)
    model.backbone.calls.clear()
    with monkeypatch.context() as m:
        m.setattr(S, 'get_probe', rec)
        r = evaluate(model, sp, progress=False, group=GROUP, **kwargs)
    return r, model.backbone.calls[:], rec.rows


@pytest.mark.parametrize('chunk', [256, 64])
def test_memory_does_not_grow_with_episodes_or_queries(monkeypatch, sp, chunk):
    model = WithHead(CodeNet(tables(sp)['noisy']))
    model.train()
    seen = {}
    for episodes, queries in [(10, 15), (40, 15), (10, 5), (40, 5)]:
        r, calls, rows = run_recorded(monkeypatch, model, sp, episodes=episodes, queries=queries, chunk=chunk)
        n_images = episodes * 5 * (5 + queries)
        assert sum(c['n'] for c in calls) == n_images                # each image passed forward once, for both shot counts
        assert max(c['n'] for c in calls) <= chunk
        assert not any(c['training'] or c['grad'] or c['in_grad'] or c['out_grad'] for c in calls)
        assert model.training and model.backbone.training           # back in train mode afterwards
        assert all(not g for *_, g in rows)
        fitted = [n for k, n, _ in rows if k == 'fit']
        # the 1- and 5-shot probes of each group, and every episode's queries scored once per shot count
        assert sum(n for k, n, _ in rows if k == 'predict') == 2 * episodes * 5 * queries
        assert sum(fitted) == episodes * 5 * (1 + 5)
        held = max(n for _, n, _ in rows)
        assert held <= GROUP + chunk
        assert r[1].accs.shape == r[5].accs.shape == (episodes,)
        seen[episodes, queries] = max(c['n'] for c in calls), max(fitted), held
    # four times the episodes: the same largest forward batch and the same largest probe
    assert seen[10, 15] == seen[40, 15] and seen[10, 5] == seen[40, 5]


def test_grouping_does_not_change_the_accuracies(sp):
    model = CodeNet(tables(sp)['noisy'])
    dl = episode_dl(sp, 'test', 5, 5, 15, n=13, bs=3, seed=1, device='cpu')
    whole = score_episodes(ProbeScorer(model, (1, 5), chunk=512, group=2 ** 15), dl)
    for group in (1, 250, 700):
        parts = score_episodes(ProbeScorer(model, (1, 5), chunk=512, group=group), dl)
        for s in (1, 5): np.testing.assert_allclose(parts[s], whole[s], atol=1e-6)
    assert len(model.calls) == 4 * 5 and whole[1].shape == (13,)   # 5 batches (3+3+3+3+1 episodes) a run
    assert [c['n'] for c in model.calls[:5]] == [300, 300, 300, 300, 100]


# ---------------------------------------------------------------- Learner.evaluate

def test_learner_evaluate(sp):
    dls = mtl_dls(sp, test_shots=(1, 5), test_episodes=10, val_episodes=6, **SMALL)
    model = WithHead(CodeNet(tables(sp)['noisy']))
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat())
    kw = dict(episodes=10, progress=False)
    r = learn.evaluate(**kw)
    ref = evaluate(learn.model, dls, **kw)
    assert isinstance(r, EvalResults) and list(r) == [1, 5]
    for s in (1, 5): assert np.array_equal(r[s].accs, ref[s].accs) and np.array_equal(r[s].accs, evaluate(model, sp, **kw)[s].accs)
    assert np.array_equal(evaluate(learn, **kw)[5].accs, ref[5].accs)
    # another source, split and sizes through the learner
    v = learn.evaluate(sp, split='val', ways=3, shots=2, queries=4, **kw)
    assert isinstance(v, EvalResult) and (v.ways, v.shots, v.queries) == (3, 2, 4) and v.accs.shape == (10,)
    assert np.array_equal(v.accs, evaluate(model, sp, split='val', ways=3, shots=2, queries=4, **kw).accs)
    assert not np.array_equal(v.accs, evaluate(model, sp, split='test', ways=3, shots=2, queries=4, **kw).accs)
    # an EpisodeDL is scored as it is, and refuses what it cannot give
    assert np.array_equal(evaluate(model, dls[2], progress=False)[1].accs, r[1].accs)
    with pytest.raises(ValueError, match='cannot give 5 shots'): evaluate(model, dls[2], episodes=4, progress=False)
    with pytest.raises(ValueError, match='cannot give 9 shots'): evaluate(model, dls[2], shots=9, progress=False)
    # fewer episodes than the loader's, drawn again from the benchmark, are its first ones
    assert np.array_equal(learn.evaluate(episodes=4, progress=False)[1].accs, r[1].accs[:4])


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize('kw,msg', [
    (dict(split='bogus'), "unknown split 'bogus'"),
    (dict(shots=(1, 11)), '26 images a class'),             # 11 + 15 queries, but the classes have 25 images
    (dict(shots=5, queries=21), '26 images a class'),
    (dict(ways=8), '8 classes but the test split'),
    (dict(ways=7, split='val'), '7 classes but the val split'),
    (dict(ways=1), 'ways must be at least 2'),
])
def test_bad_sizes(sp, kw, msg):
    with pytest.raises(ValueError, match=msg): evaluate(CodeNet(tables(sp)['noisy']), sp, episodes=2, progress=False, **kw)


def test_more_shots_than_the_episodes_hold(sp):
    dl = episode_dl(sp, 'test', 5, 5, 15, n=2, seed=0, device='cpu')
    with pytest.raises(ValueError, match='5 support images a class, fewer than 6 shots'):
        score_episodes(ProbeScorer(CodeNet(tables(sp)['noisy']), shots=(1, 6)), dl)


def test_no_source():
    with pytest.raises(ValueError, match="episodes' source"): evaluate(nn.Linear(2, 2))
    with pytest.raises(TypeError, match='cannot take test episodes from list'): evaluate(nn.Linear(2, 2), [1, 2])


@pytest.mark.parametrize('kw,msg', [
    (dict(shots=(0, 5)), 'shot'),
    (dict(queries=0), 'queries'),
    (dict(episodes=0), 'episodes'),
])
def test_empty_episodes_are_refused(sp, kw, msg):
    with pytest.raises(ValueError, match=msg):
        evaluate(CodeNet(tables(sp)['noisy']), sp, **{'episodes': 2, 'progress': False, **kw})
