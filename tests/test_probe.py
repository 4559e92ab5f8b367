"Tests of the probes against independent references: scikit-learn's LogisticRegression written out here, numpy prototypes."
import warnings

import numpy as np
import pytest
import timm
import torch
from scipy.special import logsumexp, softmax
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from fsmtl.data.block import episode_dl
from fsmtl.features import extract_features
from fsmtl.probe import LogisticProbe, PrototypeProbe, SklearnProbe, get_probe
from conftest import one_torch_thread

WAYS, SHOTS, QUERIES, EPISODES = 5, 5, 15, 200
# scikit-learn's default tol=1e-4 stops L-BFGS after 3-9 iterations on these (nearly collinear) features, with gradient
# entries of ~3e-3 left: its predictions then differ from the optimum's on ~1% of queries (see
# test_logistic_is_the_optimum_sklearn_default_tol_stops_short). The reference is the same estimator solved to the optimum.
TIGHT = 1e-10


def sk_logistic(x, y, C=3., tol=TIGHT):
    "The reference: a plain scikit-learn logistic regression of one episode (float64 numpy)."
    with warnings.catch_warnings():
        warnings.simplefilter('error')   # no ConvergenceWarning allowed
        return LogisticRegression(C=C, solver='lbfgs', max_iter=1000, tol=tol).fit(x, y)


def sk_loop(xs, ys, xq, C=3., tol=TIGHT):
    "Predictions (E, m), probabilities (E, m, W), coef_ (E, W', D) and intercept_ (E, W') of one sklearn model per episode."
    preds, probs, coefs, ints = [], [], [], []
    with threadpool_limits(1):
        for a, b, q in zip(xs, ys, xq):
            m = sk_logistic(a, b, C, tol)
            preds.append(m.predict(q)); probs.append(m.predict_proba(q)); coefs.append(m.coef_); ints.append(m.intercept_)
    return np.stack(preds), np.stack(probs), np.stack(coefs), np.stack(ints)


def objective(W, b, x, y, C):
    "scikit-learn's objective, up to a constant factor: C * summed cross-entropy + |W|^2 / 2 (intercept free); numpy."
    logits = x @ W.T + b
    return C * (logsumexp(logits, 1) - logits[np.arange(len(y)), y]).sum() + 0.5 * (W * W).sum()


def gradient(W, b, x, y, C):
    "Largest entry of the objective's gradient in W and in b."
    p = softmax(x @ W.T + b, 1) - np.eye(W.shape[0])[y]
    return np.abs(C * p.T @ x + W).max(), np.abs(C * p.sum(0)).max()


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='session')
def glyph_features(glyph_splits):
    "Features (N, 640) of every glyph val image through a fixed-seed untrained resnet10t, and 200 val episodes' indices."
    splits = glyph_splits
    torch.manual_seed(0)
    model = timm.create_model('resnet10t', num_classes=0, channels=(64, 160, 320, 640)).eval()
    mean, std = torch.tensor(splits.mean).view(1, 3, 1, 1), torch.tensor(splits.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(splits.val.items).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with one_torch_thread(): feats = extract_features(model, x)   # (session fixtures come before module ones)
    dl = episode_dl(splits, 'val', WAYS, SHOTS, QUERIES, n=EPISODES, bs=4, seed=0, device='cpu')
    # the images normalised here are the ones the evaluation loader gives
    xb, yb = next(iter(dl))
    np.testing.assert_allclose(extract_features(model, xb).numpy(), feats[dl.episodes[:4].ravel()].numpy(), atol=1e-5)
    assert (splits.val.labels[dl.episodes].reshape(EPISODES, WAYS, -1) ==
            splits.val.labels[dl.episodes].reshape(EPISODES, WAYS, -1)[..., :1]).all()   # class-major episodes
    return feats, dl.episodes.reshape(EPISODES, WAYS, SHOTS + QUERIES)


def episode_data(glyph_features, shots, ways=WAYS, n=EPISODES):
    "Support features (n, ways*shots, D), labels (n, ways*shots), query features (n, ways*15, D) and labels, as float32 torch."
    feats, eps = glyph_features
    f = feats[torch.from_numpy(eps[:n, :ways])]                      # (n, ways, 20, D)
    xs, xq = f[:, :, :shots].flatten(1, 2), f[:, :, SHOTS:].flatten(1, 2)
    ys = torch.arange(ways).repeat_interleave(shots).expand(n, -1)
    yq = torch.arange(ways).repeat_interleave(QUERIES)
    return xs, ys, xq, yq


def np64(t): return t.double().numpy()


@pytest.mark.slow
@pytest.mark.parametrize('shots', [5, 1])
def test_logistic_matches_sklearn_on_real_features(glyph_features, shots):
    xs, ys, xq, yq = episode_data(glyph_features, shots)
    probe = LogisticProbe().fit(xs, ys)
    pred = probe.predict(xq).numpy()
    ref, ref_proba, coef, icpt = sk_loop(np64(xs), ys.numpy(), np64(xq))
    assert pred.shape == ref.shape == (EPISODES, WAYS * QUERIES)
    assert (pred == ref).mean() >= 0.995
    acc, ref_acc = (pred == yq.numpy()).mean(1), (ref == yq.numpy()).mean(1)
    assert abs(acc.mean() - ref_acc.mean()) <= 0.001
    assert 0.21 < ref_acc.mean() < 0.95                            # neither chance nor trivial: a real comparison
    # weights and intercepts; intercepts up to a common shift, free in the multinomial model
    assert probe.W.shape == coef.shape == (EPISODES, WAYS, 640) and probe.b.shape == (EPISODES, WAYS)
    np.testing.assert_allclose(np64(probe.W), coef, atol=2e-5 * np.abs(coef).max())
    b, ib = np64(probe.b), icpt
    np.testing.assert_allclose(b - b.mean(1, keepdims=True), ib - ib.mean(1, keepdims=True), atol=1e-4)
    # probabilities sum to one and agree with sklearn's
    proba = probe.predict_proba(xq).numpy()
    np.testing.assert_allclose(proba.sum(-1), 1, atol=1e-5)
    np.testing.assert_allclose(proba, ref_proba, atol=2e-5)


@pytest.mark.parametrize('shots', [5, 1])
def test_two_way_is_sklearns_binomial_model(glyph_features, shots):
    xs, ys, xq, yq = episode_data(glyph_features, shots, ways=2, n=100)
    probe = LogisticProbe().fit(xs, ys)
    ref, ref_proba, coef, icpt = sk_loop(np64(xs), ys.numpy(), np64(xq))
    assert coef.shape == (100, 1, 640)                               # sklearn fits one binomial model
    w = np64(probe.W[:, 1] - probe.W[:, 0])
    np.testing.assert_allclose(w, coef[:, 0], atol=2e-5 * np.abs(coef).max())
    np.testing.assert_allclose(np64(probe.b[:, 1] - probe.b[:, 0]), icpt[:, 0], atol=1e-4)
    assert (probe.predict(xq).numpy() == ref).mean() >= 0.995
    np.testing.assert_allclose(probe.predict_proba(xq).numpy(), ref_proba, atol=2e-5)
    # a multinomial model with C (not C/2) would be a different, less regularised, solution
    other = [LogisticRegression(C=6., max_iter=1000, tol=TIGHT).fit(a, b).coef_[0] for a, b in zip(np64(xs[:3]), ys[:3].numpy())]
    assert np.abs(w[:3] - np.stack(other)).max() > 100 * 2e-5 * np.abs(coef).max()


def test_logistic_is_the_optimum_sklearn_default_tol_stops_short(glyph_features):
    "The probe's solution is a stationary point of sklearn's objective (numpy gradient) and no worse than default-tol sklearn."
    xs, ys, xq, _ = episode_data(glyph_features, SHOTS, n=20)
    probe = LogisticProbe().fit(xs.double(), ys)
    worse = 0
    with threadpool_limits(1):
        for e in range(20):
            x, y, W, b = np64(xs[e]), ys[e].numpy(), np64(probe.W[e]), np64(probe.b[e])
            gw, gb = gradient(W, b, x, y, 3.)
            assert gw < 1e-6 and gb < 1e-6
            loose = LogisticRegression(C=3, solver='lbfgs', max_iter=1000).fit(x, y)
            f_probe, f_sk = objective(W, b, x, y, 3.), objective(loose.coef_, loose.intercept_, x, y, 3.)
            assert f_probe <= f_sk + 1e-9 * abs(f_sk)
            worse += f_sk > f_probe + 1e-7
    assert worse > 0   # sklearn's default tolerance does leave it short of the optimum on these features


def test_sklearn_probe_is_the_plain_sklearn_loop(glyph_features):
    xs, ys, xq, _ = episode_data(glyph_features, SHOTS, n=30)
    probe = SklearnProbe().fit(xs, ys)
    ref, ref_proba, _, _ = sk_loop(np64(xs), ys.numpy(), np64(xq), tol=1e-4)   # SklearnProbe keeps sklearn's default tol
    assert np.array_equal(probe.predict(xq).numpy(), ref)
    proba = probe.predict_proba(xq)
    assert proba.dtype == torch.float32
    np.testing.assert_allclose(proba.numpy(), ref_proba, atol=1e-6)


def test_prototype_probe_is_nearest_normalised_mean(glyph_features):
    xs, ys, xq, yq = episode_data(glyph_features, SHOTS)
    probe = PrototypeProbe().fit(xs, ys)
    s, q = np64(xs).reshape(EPISODES, WAYS, SHOTS, -1), np64(xq)
    s /= np.linalg.norm(s, axis=-1, keepdims=True)
    protos = s.mean(2)
    protos /= np.linalg.norm(protos, axis=-1, keepdims=True)
    cos = np.einsum('emd,ewd->emw', q / np.linalg.norm(q, axis=-1, keepdims=True), protos)
    assert np.array_equal(probe.predict(xq).numpy(), cos.argmax(-1))
    np.testing.assert_allclose(probe.predict_proba(xq).numpy(), softmax(10 * cos, -1), atol=1e-5)
    assert 0.21 < (cos.argmax(-1) == yq.numpy()).mean() < 0.95


def prototype_reference(xs, xq, ways):
    "Nearest normalised mean of the normalised supports by cosine, in numpy: (predictions, cosines)."
    s = xs / np.linalg.norm(xs, axis=-1, keepdims=True)
    p = s.reshape(len(xs), ways, -1, xs.shape[-1]).mean(2)
    p /= np.linalg.norm(p, axis=-1, keepdims=True)
    cos = np.einsum('emd,ewd->emw', xq / np.linalg.norm(xq, axis=-1, keepdims=True), p)
    return cos.argmax(-1), cos


def test_prototype_probe_normalises_each_support():
    # unnormalised features of very different norms: a plain mean would be dominated by the largest support
    xs, ys, xq = gaussian_episodes(40, 5, 5, 16, seed=1)
    rng = np.random.default_rng(2)
    xs, xq = xs * rng.uniform(.05, 20, size=xs.shape[:2] + (1,)), xq * rng.uniform(.05, 20, size=xq.shape[:2] + (1,))
    probe = PrototypeProbe(scale=3.).fit(torch.from_numpy(xs), torch.from_numpy(ys))
    pred, cos = prototype_reference(xs, xq, 5)
    assert np.array_equal(probe.predict(torch.from_numpy(xq)).numpy(), pred)
    np.testing.assert_allclose(probe.predict_proba(torch.from_numpy(xq)).numpy(), softmax(3 * cos, -1), atol=1e-10)
    plain = xs.reshape(40, 5, 5, 16).mean(2)
    plain_pred = np.einsum('emd,ewd->emw', xq, plain / np.linalg.norm(plain, axis=-1, keepdims=True)).argmax(-1)
    assert (plain_pred != pred).mean() > 0.01                         # the test tells the two apart


@pytest.mark.parametrize('cls', [LogisticProbe, SklearnProbe, PrototypeProbe])
def test_single_episode_input_equals_batched(glyph_features, cls):
    xs, ys, xq, _ = episode_data(glyph_features, SHOTS, n=4)
    batched = cls().fit(xs, ys)
    for e in range(4):
        one = cls().fit(xs[e], ys[e])
        pred, proba = one.predict(xq[e]), one.predict_proba(xq[e])
        assert pred.shape == (WAYS * QUERIES,) and proba.shape == (WAYS * QUERIES, WAYS)
        assert torch.equal(pred, batched.predict(xq)[e])
        np.testing.assert_allclose(proba.numpy(), batched.predict_proba(xq)[e].numpy(), atol=1e-5)


@pytest.mark.parametrize('cls', [LogisticProbe, SklearnProbe, PrototypeProbe])
def test_bad_input_gives_clear_errors(cls):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 6, generator=g)
    with pytest.raises(RuntimeError, match='not fitted'): cls().predict(x)
    with pytest.raises(RuntimeError, match='not fitted'): cls().predict_proba(x)
    # class 1 missing from the labels 0..2
    with pytest.raises(ValueError, match='every class present'): cls().fit(x, torch.tensor([0, 2] * 6))
    # class 2 missing from the second episode only
    y2 = torch.stack([torch.arange(3).repeat(4), torch.tensor([0, 1] * 6)])
    with pytest.raises(ValueError, match='every class present'): cls().fit(torch.randn(2, 12, 6, generator=g), y2)
    with pytest.raises(ValueError, match='at least two classes'): cls().fit(x, torch.zeros(12, dtype=torch.long))
    with pytest.raises(ValueError, match='one label per image'): cls().fit(x, torch.arange(3).repeat(4)[:11])
    with pytest.raises(ValueError, match='features must be'): cls().fit(x[None, None], torch.arange(3).repeat(4))
    fitted = cls().fit(torch.randn(2, 12, 6, generator=g), torch.arange(3).repeat(4).expand(2, -1))
    with pytest.raises(ValueError, match='fitted on 2 episodes'): fitted.predict(torch.randn(3, 5, 6, generator=g))


def test_negative_labels_give_the_probes_own_error():
    # _n_classes means to reject labels below 0 with its own message, but F.one_hot fails first with torch's RuntimeError
    with pytest.raises(ValueError, match='support labels must be 0..'):
        LogisticProbe().fit(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, -1, -1]))


def test_get_probe():
    with pytest.raises(ValueError, match="unknown probe 'svm'.*logistic"): get_probe('svm')
    assert type(get_probe('L2', C=.5)) is LogisticProbe and get_probe('L2', C=.5).C == .5
    assert type(get_probe('sklearn', C=.5)) is SklearnProbe and get_probe('sklearn', C=.5).C == .5
    assert type(get_probe('prototype')) is PrototypeProbe and type(get_probe('proto')) is PrototypeProbe
    p = PrototypeProbe()
    assert get_probe(p) is p


def gaussian_episodes(E, ways, shots, D, seed, scale=1.):
    "Episodes of Gaussian classes around random means: support (E, ways*shots, D), labels, queries (E, ways*10, D)."
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(E, ways, 1, D))
    xs = (means + rng.normal(size=(E, ways, shots, D))).reshape(E, ways * shots, D) * scale
    xq = (means + rng.normal(size=(E, ways, 10, D))).reshape(E, ways * 10, D) * scale
    ys = np.repeat(np.arange(ways), shots)[None].repeat(E, 0)
    return xs, ys, xq


@pytest.mark.parametrize('ways,C,scale', [(5, 3., 1.), (5, .1, 3.), (2, 3., 1.), (3, 30., .5)])
def test_few_features_and_duplicates_agree_with_sklearn(ways, C, scale):
    # D = 8 features for 25 (or more) support images: the Gram matrix is singular; and unnormalised features
    xs, ys, xq = gaussian_episodes(12, ways, 5, 8, seed=ways, scale=scale)
    # duplicated support images: each episode's first two images of every class twice more
    dup = np.concatenate([xs, xs.reshape(12, ways, 5, 8)[:, :, :2].reshape(12, -1, 8).repeat(2, 1)], 1)
    ydup = np.concatenate([ys, np.repeat(np.arange(ways), 2)[None].repeat(12, 0).repeat(2, 1)], 1)
    for x, y in [(xs, ys), (dup, ydup)]:
        probe = LogisticProbe(C=C, episodes_per_solve=5).fit(torch.from_numpy(x), torch.from_numpy(y))   # chunks of 5, 5 and 2 episodes
        ref, ref_proba, coef, icpt = sk_loop(x, y, xq, C=C)
        assert np.array_equal(probe.predict(torch.from_numpy(xq)).numpy(), ref)
        np.testing.assert_allclose(probe.predict_proba(torch.from_numpy(xq)).numpy(), ref_proba, atol=1e-5)
        W, b = probe.W.numpy(), probe.b.numpy()
        if ways == 2: W, b = W[:, 1:] - W[:, :1], b[:, 1:] - b[:, :1]
        np.testing.assert_allclose(W, coef, atol=1e-5 * max(1, np.abs(coef).max()))
        np.testing.assert_allclose(b - b.mean(1, keepdims=True), icpt - icpt.mean(1, keepdims=True), atol=1e-4)


def test_duplicate_images_count_twice():
    "Duplicating supports is not a no-op: it weighs those images twice in the loss, as sklearn does."
    xs, ys, xq = gaussian_episodes(1, 3, 2, 8, seed=7)
    dup, ydup = np.concatenate([xs, xs[:, :1].repeat(3, 1)], 1), np.concatenate([ys, np.zeros((1, 3), int)], 1)
    a = LogisticProbe().fit(torch.from_numpy(xs), torch.from_numpy(ys)).W
    b = LogisticProbe().fit(torch.from_numpy(dup), torch.from_numpy(ydup)).W
    assert (a - b).abs().max() > 1e-3
    np.testing.assert_allclose(b[0].numpy(), sk_logistic(dup[0], ydup[0]).coef_, atol=1e-5)
