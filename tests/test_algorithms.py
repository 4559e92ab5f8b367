"Meta-learners: heads and MAML steps against hand computations and scikit-learn; each trains on glyphs; clear errors."
import dataclasses
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastai.torch_core import set_seed
from sklearn.linear_model import Ridge
from sklearn.svm import LinearSVC
from torch import nn

import fsmtl.algorithms as A
import fsmtl.train as T
from fsmtl.cli import main
from fsmtl.classifier import FewShotClassifier
from fsmtl.data.block import mtl_dls
from fsmtl.data.core import Split
from fsmtl.heads import (ANILModel, BaseClassLoss, EpisodeLoss, FeatureHeadModel, MAMLModel, MTLModel, MultiTaskLoss,
                         ridge_logits, svm_logits)
from fsmtl.learner import meta_learner
from fsmtl.models import create_backbone
from fsmtl.train import train
from helpers import TEST_SEED, assert_gain

pytestmark = pytest.mark.usefixtures('one_thread')
HAS_QPTH = importlib.util.find_spec('qpth') is not None and importlib.util.find_spec('cvxpy') is not None
TASKS, WAYS, SHOTS, QUERIES = 2, 3, 2, 2


def task_batch(dim=5, seed=0):
    "Inputs of TASKS tasks, task-major and class-major, and their (unused) global labels."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TASKS * WAYS * (SHOTS + QUERIES), dim, generator=g, dtype=torch.float64)
    return x, torch.arange(len(x)) // (SHOTS + QUERIES)


def test_protonet_loss_equals_a_hand_computation_in_value_and_gradient():
    x, y = task_batch()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    model, loss_func = FeatureHeadModel(nn.Identity(), WAYS, SHOTS, QUERIES, 'proto'), EpisodeLoss(WAYS, QUERIES)
    loss = loss_func(model(x1), y)
    loss.backward()
    # by hand: per task, class means of the first SHOTS of each class, squared distances, log-softmax, one query at a time
    terms = []
    for t in range(TASKS):
        task = x2[t * WAYS * (SHOTS + QUERIES):(t + 1) * WAYS * (SHOTS + QUERIES)]
        means = [sum(task[c * (SHOTS + QUERIES) + i] for i in range(SHOTS)) / SHOTS for c in range(WAYS)]
        for c in range(WAYS):
            for i in range(SHOTS, SHOTS + QUERIES):
                d = torch.stack([((task[c * (SHOTS + QUERIES) + i] - m) ** 2).sum() for m in means])
                terms.append(d[c] + torch.logsumexp(-d, 0))
    hand = torch.stack(terms).mean()
    hand.backward()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-10)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-12) and x1.grad.abs().sum() > 0


def tiny_maml(head_only, first_order, dim=5, nf=4):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(dim, nf), nn.Tanh()).double()
    return (ANILModel if head_only else MAMLModel)(backbone, nf, WAYS, SHOTS, QUERIES, adaptation_steps=1, adaptation_lr=0.5,
                                                  first_order=first_order).double()


def hand_maml_loss(params, x, head_only, first_order, lr=0.5):
    "The query loss after one functional SGD step on each task's support loss (only the head's step when `head_only`)."
    w1, b1, head = params
    net = lambda x, w1, b1, head: F.linear(torch.tanh(F.linear(x, w1, b1)), head[:, :-1], head[:, -1])
    z = x.view(TASKS, WAYS, SHOTS + QUERIES, -1)
    ys, yq = torch.arange(WAYS).repeat_interleave(SHOTS), torch.arange(WAYS).repeat_interleave(QUERIES)
    losses = []
    for t in range(TASKS):
        xs, xq = z[t, :, :SHOTS].flatten(0, 1), z[t, :, SHOTS:].flatten(0, 1)
        inner = [head] if head_only else [w1, b1, head]
        grads = torch.autograd.grad(F.cross_entropy(net(xs, w1, b1, head), ys), inner, create_graph=not first_order)
        new = [p - lr * (g.detach() if first_order else g) for p, g in zip(inner, grads)]
        losses.append(F.cross_entropy(net(xq, w1, b1, new[0]) if head_only else net(xq, *new), yq))
    return torch.stack(losses).mean()


@pytest.mark.parametrize('head_only', [False, True], ids=['maml', 'anil'])
def test_one_adaptation_step_equals_a_hand_written_functional_step(head_only):
    x, y = task_batch()
    outer = {}
    for first_order in (False, True):
        model = tiny_maml(head_only, first_order)
        params = [model.backbone[0].weight, model.backbone[0].bias, model.head]
        loss = EpisodeLoss(WAYS, QUERIES)(model(x), y)
        got = torch.autograd.grad(loss, params)
        hand_params = [p.detach().clone().requires_grad_() for p in params]
        hand = hand_maml_loss(hand_params, x, head_only, first_order)
        want = torch.autograd.grad(hand, hand_params)
        assert loss.item() == pytest.approx(hand.item(), rel=1e-10)
        for a, b in zip(got, want): assert torch.allclose(a, b, atol=1e-10)
        outer[first_order] = got
    # the two orders differ, so each comparison above tells them apart
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(outer[False], outer[True]))


def test_anil_adapts_only_the_head_and_maml_the_whole_network():
    x, _ = task_batch()
    xs, ys = x[:WAYS * SHOTS], torch.arange(WAYS).repeat_interleave(SHOTS)
    for head_only in (True, False):
        model = tiny_maml(head_only, False)
        before = [p.detach().clone() for p in model.backbone.parameters()]
        learner = model.adapt(xs, ys)
        adapted = list(learner.module.backbone.parameters() if not head_only else learner.backbone.parameters())
        same = all(torch.equal(a, b) for a, b in zip(adapted, before))
        head = learner.module.head.weight if not head_only else learner.head.module.weight
        assert same == head_only and not torch.allclose(head, model.head)
        # the model's own weights are left as they were
        assert all(torch.equal(a, b) for a, b in zip(model.backbone.parameters(), before))


def clustered_tasks(tasks=20, ways=5, shots=5, queries=15, dim=16, scale=1., seed=0):
    "Support and query features of `tasks` tasks drawn around class centres, and their labels."
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(tasks, ways, 1, dim))
    f = torch.tensor(scale * (centres + 1.2 * rng.normal(size=(tasks, ways, shots + queries, dim))), dtype=torch.float64)
    s, q = f[:, :, :shots].flatten(1, 2), f[:, :, shots:].flatten(1, 2)
    return s, torch.arange(ways).repeat_interleave(shots).expand(tasks, -1), q


def test_r2d2_head_predicts_as_scikit_learn_ridge():
    s, y, q = clustered_tasks()
    scores = ridge_logits(s, y, q, 5, lam=5.)
    agree, n = 0, 0
    for t in range(len(s)):
        ref = Ridge(alpha=5., fit_intercept=False).fit(s[t].numpy(), F.one_hot(y[t], 5).numpy())
        np.testing.assert_allclose(scores[t].numpy(), ref.predict(q[t].numpy()), atol=1e-8)
        agree += int((scores[t].argmax(1).numpy() == ref.predict(q[t].numpy()).argmax(1)).sum())
        n += len(q[t])
    assert agree / n >= 0.99


@pytest.mark.skipif(not HAS_QPTH, reason='metaoptnet needs qpth and cvxpy (tools/install.sh installs them)')
def test_metaoptnet_head_predicts_as_crammer_singer_linear_svc():
    # large features: MetaOptNet's QP adds an identity to the kernel, negligible against a large kernel
    s, y, q = clustered_tasks(tasks=10, scale=10.)
    pred = svm_logits(s.float(), y, q.float(), 5, C=0.1, max_iters=50).argmax(-1)
    agree = sum(int((pred[t].numpy() == LinearSVC(C=0.1, multi_class='crammer_singer', fit_intercept=False, tol=1e-6,
                                                     max_iter=100_000).fit(s[t].numpy(), y[t].numpy()).predict(q[t].numpy())).sum())
                for t in range(len(s)))
    assert agree / pred.numel() >= 0.99


def small(root, tmp_path, **kw):
    "Options of a short CPU run on glyphs with a small ResNet-12."
    return dict(dict(dataset='glyphs-small', root=str(root), log_dir=str(tmp_path / 'runs'), run_name='run',
                     model_kwargs=dict(channels=(16, 32, 32, 64)), meta_batch_size=2, train_shots=5, train_queries=5,
                     epoch_length=40, val_epoch_length=10, final_test_epoch_length=300, test_queries=10,
                     scheduler='one_cycle', lr=3e-3, max_epochs=4, progress=False, baseline=True, seed=TEST_SEED), **kw)


def test_pretrain_loss_is_one_softmax_over_all_base_classes(glyph_splits):
    gen = torch.Generator().manual_seed(0)
    logits, y = torch.randn(30, 250, generator=gen), torch.randint(0, 250, (30,), generator=gen)
    # by hand: the log of the sum of exponentials over every base class, less the true class's logit
    by_hand = sum(math.log(sum(math.exp(v) for v in row)) - row[c] for row, c in zip(logits.tolist(), y.tolist())) / 30
    assert BaseClassLoss()(logits, y).item() == pytest.approx(by_hand, rel=1e-5)
    # through the learner: a batch of tasks scored over all 250 base classes, from a zero head at ln(250)
    dls = mtl_dls(glyph_splits, meta_batch_size=2, epoch_length=2, val_episodes=2, test_episodes=2, device='cpu')
    learn = meta_learner(dls, 'pretrain', arch_kwargs=dict(channels=(8, 16, 16, 32)))
    x, yb = dls.train.one_batch()
    assert isinstance(learn.loss_func, BaseClassLoss) and learn.model(x).shape == (len(yb), 250)
    assert learn.loss_func(learn.model(x), yb).item() == pytest.approx(math.log(250), abs=1e-5)


def test_pretrain_draws_its_images_at_random_and_mtl_whole_tasks(glyph_splits):
    "pretrain's batches: 100 images from all 250 base classes at random (RFS's), not 10 classes of 10; MTL's stay tasks."
    dls = mtl_dls(glyph_splits, meta_batch_size=2, epoch_length=20, val_episodes=2, test_episodes=2, device='cpu')
    counts = lambda: [len(y.unique()) for _, y in dls.train]
    meta_learner(dls, 'pretrain', arch_kwargs=dict(channels=(8, 8, 8, 8)))
    pooled = counts()
    # 100 draws without replacement from 5,110 images of 250 classes: about 82 distinct classes, never as few as 40
    assert len(pooled) == 10 and min(pooled) > 40, pooled
    meta_learner(dls, 'mtl', arch_kwargs=dict(channels=(8, 8, 8, 8)))
    assert all(len(t.unique()) == 5 for _, y in dls.train for t in y.view(2, 50))   # two tasks of five classes a batch
    # seeded as the tasks are: the same seed draws the same images, so a resumed run draws what the uninterrupted one did
    meta_learner(dls, 'pretrain', arch_kwargs=dict(channels=(8, 8, 8, 8)))
    draws = []
    for _ in range(2):
        set_seed(3)
        draws.append(torch.cat([y for _, y in dls.train]))
    assert torch.equal(*draws)


@pytest.mark.slow
def test_pretrain_trains(glyph_splits):
    "On the first 10 base classes, from ln(10) at the zero head, the loss falls and the accuracy over them rises above chance."
    tr = glyph_splits.train
    keep = tr.labels < 10
    splits = dataclasses.replace(glyph_splits, train=Split(tr.items[keep], tr.labels[keep], tr.classes[:10]))
    torch.manual_seed(0)
    dls = mtl_dls(splits, meta_batch_size=2, epoch_length=40, val_episodes=2, test_episodes=2, device='cpu')
    learn = meta_learner(dls, 'pretrain', arch_kwargs=dict(channels=(8, 16, 16, 32)), lr=1e-2)
    learn.fit(4)
    h = learn.recorder.history()
    # 20 batches of 100 images an epoch: at chance (1/10) the accuracy's 95% CI is about 0.02, its images being correlated
    assert h['train_loss'].iloc[-1] < math.log(10) - 0.15 and h['task_acc'].iloc[-1] > 0.1 + 0.1


# the shortest runs that clear the bar on 2 cores by a margin of 3 or more, each at the learning rate it takes best.
# MAML, ANIL and MetaOptNet learn too slowly or unevenly on the CPU for a short run to beat the untrained backbone by a
# margin under every seed: `test_meta_objective_falls_on_a_batch` checks that their meta-objective falls instead.
SETTINGS = dict(protonet=dict(lr=1e-2, max_epochs=3), r2d2=dict(lr=1e-2, max_epochs=3))


@pytest.mark.parametrize('algorithm', ['anil', 'maml', pytest.param('metaoptnet', marks=pytest.mark.skipif(
    not HAS_QPTH, reason='metaoptnet needs qpth and cvxpy'))])
def test_meta_objective_falls_on_a_batch(glyph_splits, algorithm):
    "50 Adam steps on one batch of 2 tasks take the query loss of the episodic head from chance, ln(5), to under a quarter of it."
    set_seed(TEST_SEED)
    dls = mtl_dls(glyph_splits, meta_batch_size=2, train_shots=5, train_queries=5, epoch_length=2, val_episodes=2,
                  test_episodes=2, device='cpu')
    learn = meta_learner(dls, algorithm, arch_kwargs=dict(channels=(8, 16, 16, 32)), adaptation_lr=0.1, first_order=True)
    x, y = dls.train.one_batch()
    model, opt = learn.model.train(), torch.optim.Adam(learn.model.parameters(), 1e-2)
    losses = []
    for _ in range(50):
        loss = learn.loss_func(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    # measured at 50 steps: from 1.6-1.8 to 0.04-0.07 (MetaOptNet), lower for MAML and ANIL, under seeds 0 and 1
    assert abs(losses[0] - math.log(5)) < 0.5 and losses[-1] < math.log(5) / 4, losses


@pytest.mark.statistical
@pytest.mark.slow
@pytest.mark.parametrize('algorithm', list(SETTINGS))
def test_each_algorithm_learns_on_glyphs(glyph_root, tmp_path, algorithm):
    res = train(**small(glyph_root, tmp_path, algorithm=algorithm, **SETTINGS[algorithm]))
    for s in (1, 5): assert_gain(f'{algorithm} learns, {s}-shot', res.test[s].accs, res.untrained[s].accs)
    if algorithm == 'protonet':
        # the native head from the best checkpoint: prototypes of the raw features, the same episodes as the linear probe
        native = T.evaluate_checkpoint(res.run_dir, root=str(glyph_root), test_method='native', final_test_epoch_length=20,
                                       progress=False)
        assert len(native[5].accs) == 20 and native[5].mean > 0.3
        best = FewShotClassifier.from_checkpoint(res.run_dir / 'best.pth')   # the native test's weights, not the last epoch's
        by_hand = native_protonet(best.backbone, res.learner.dls.splits)
        assert native[1].accs.tolist() == pytest.approx(by_hand.tolist())


def native_protonet(backbone, splits):
    "1-shot native accuracy of each test episode by hand: nearest support feature by Euclidean distance."
    from fsmtl.data.block import episode_dl
    accs = []
    backbone.eval()
    with torch.no_grad():
        for x, _ in episode_dl(splits, 'test', 5, 5, 10, n=20, bs=8, seed=TEST_SEED, device='cpu'):   # the run's seed
            f = backbone(x)
            f = f.view(-1, 5, 15, f.shape[-1])
            for e in f:
                d = torch.cdist(e[:, 5:].flatten(0, 1), e[:, 0])
                accs.append((d.argmin(1) == torch.arange(5).repeat_interleave(10)).float().mean().item())
    return np.array(accs)


@pytest.mark.parametrize('bad,match', [
    (dict(algorithm='reptile'), 'unknown algorithm'),
    (dict(algorithm='maml', adaptation_steps=0), 'adaptation_steps must be at least 1'),
    (dict(algorithm='anil', adaptation_lr=0.), 'adaptation_lr must be positive'),
    (dict(algorithm='protonet', train_queries=0), 'train_queries'),
    (dict(algorithm='protonet', train_queries=1000), 'shots \\+ queries'),
    (dict(algorithm='protonet', norm_train_features=True), 'norm_train_features'),
    (dict(algorithm='maml', original_head=True), 'original_head is an option of algorithms mtl and pretrain only'),
    (dict(algorithm='mtl', test_method='native'), 'native'),
    (dict(algorithm='pretrain', test_method='native'), 'native'),
    (dict(algorithm='r2d2', ridge_lambda=0), 'ridge_lambda')])
def test_bad_values_give_clear_errors(glyph_root, tmp_path, bad, match):
    with pytest.raises(ValueError, match=match): train(**small(glyph_root, tmp_path, **bad))


def test_options_are_shown_by_fsmtl_train_help(capsys):
    with pytest.raises(SystemExit): main(['train', '--help'])
    out = capsys.readouterr().out
    for flag in ('--algorithm', '--adaptation_steps', '--adaptation_lr', '--first_order', '--svm_C', '--svm_max_iters'):
        assert flag in out
    assert 'protonet' in out and 'maml' in out


def test_mtl_keeps_its_model_and_loss(glyph_splits):
    dls = mtl_dls(glyph_splits, train_shots=2, train_queries=3, meta_batch_size=2, epoch_length=4, val_episodes=2,
                  test_episodes=2, device='cpu')
    learn = meta_learner(dls, 'mtl', arch_kwargs=dict(channels=(8, 16, 16, 32)))
    assert type(learn.model) is MTLModel and type(learn.loss_func) is MultiTaskLoss
    proto = meta_learner(dls, 'protonet', arch_kwargs=dict(channels=(8, 16, 16, 32)))
    x, y = dls.one_batch()
    # the meta-learner scores the queries: 3 of each class of each task, over the task's 5 classes
    assert proto.model(x).shape == (2 * 5 * 3, 5) and proto.model.shots == 2


class CosineModel(nn.Module):
    "A toy algorithm's model: scaled cosine similarity of the features to one head row a base class."
    def __init__(self, backbone, nf, n_base, scale):
        super().__init__()
        self.backbone, self.scale, self.head = backbone, scale, nn.Parameter(torch.randn(n_base, nf))
    def forward(self, x): return self.scale * F.normalize(self.backbone(x), dim=-1) @ F.normalize(self.head, dim=-1).T


class Cosine(A.Algorithm):
    "A toy: cosine scores over all base classes, scaled by its own option."
    name, about, options = 'cosine', 'a test of the registry', {'cosine_scale': (10., 'cosine: the scale of the scores')}
    def model(self, backbone, nf, n_base, ways, shots, queries): return CosineModel(backbone, nf, n_base, self.cosine_scale)
    def loss(self, ways, shots, queries): return BaseClassLoss()


@pytest.fixture
def cosine(monkeypatch):
    "The registry with the toy algorithm `cosine` registered, for this test only."
    monkeypatch.setattr(A, 'ALGORITHMS', dict(A.ALGORITHMS))
    A.register_algorithm(Cosine)


def tiny_run(root, tmp_path, **kw):
    "Options of a one-epoch run of four tasks, on the narrowest ResNet-12."
    return small(root, tmp_path, **dict(dict(model_kwargs=dict(channels=(8, 8, 8, 8)), epoch_length=4, val_epoch_length=2,
                                             final_test_epoch_length=4, max_epochs=1, baseline=False), **kw))


def test_a_registered_algorithm_trains_through_train_and_the_shell(cosine, glyph_root, tmp_path):
    res = train(**tiny_run(glyph_root, tmp_path, algorithm='cosine', cosine_scale=4.))
    model = res.learner.model
    assert type(model) is CosineModel and model.scale == 4. and type(res.learner.loss_func) is BaseClassLoss
    # its head trained: the best checkpoint's differs from the initial one drawn under the run's seed
    set_seed(TEST_SEED)
    head0 = A.get_algorithm('cosine').model(*create_backbone('resnet12', channels=(8, 8, 8, 8)), 250, 5, 5, 5).head
    assert model.head.shape == head0.shape == (len(res.learner.dls.splits.train.classes), 8)
    assert not torch.allclose(model.head, head0) and set(res.test) == {1, 5}
    assert json.loads((res.run_dir / 'config.json').read_text())['cosine_scale'] == 4.
    with pytest.raises(ValueError, match='native is a meta-learner'):
        train(**tiny_run(glyph_root, tmp_path, algorithm='cosine', test_method='native'))
    argv = ['train', *(f'--{k}={json.dumps(v) if isinstance(v, dict) else v}' for k, v in
                       tiny_run(glyph_root, tmp_path, run_name='shell').items() if k not in ('progress', 'baseline'))]
    assert main(argv + ['--algorithm', 'cosine', '--cosine-scale', '2.5']) == 0
    config = json.loads((tmp_path / 'runs' / 'shell' / 'config.json').read_text())
    assert config['algorithm'] == 'cosine' and config['cosine_scale'] == 2.5
    assert json.loads((tmp_path / 'runs' / 'shell' / 'results.json').read_text())['test']['5shot']['episodes'] == 4
