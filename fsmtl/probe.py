"Linear probes fitted on the support features of many episodes at once."
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ['LogisticProbe', 'SklearnProbe', 'PrototypeProbe', 'get_probe', 'PROBES']


def _episodes(x, y=None):
    "`x` as (E, n, D), `y` as (E, n) long, and whether an episode axis was added."
    single = x.dim() == 2
    if single: x = x[None]
    if x.dim() != 3: raise ValueError(f"features must be (episodes, images, features) or (images, features), got {tuple(x.shape)}")
    if y is None: return x, None, single
    y = torch.as_tensor(y, device=x.device)
    if y.is_floating_point() and bool((y != y.round()).any()): raise ValueError("support labels must be whole numbers 0..W-1")
    y = y.long()
    if single: y = y[None]
    if y.shape != x.shape[:2]:
        raise ValueError(f"{tuple(y.shape)} labels for {tuple(x.shape[:2])} support features: one label per image is needed")
    return x, y, single


def _n_classes(y) -> int:
    "The classes 0..W-1 of the episodes' labels; every episode must have each of them."
    if y.numel() == 0: raise ValueError("no support labels: give a few labelled images of each class")
    if int(y.min()) < 0: raise ValueError(f"support labels must be 0..W-1, got {int(y.min())}")
    ways = int(y.max()) + 1
    if ways < 2: raise ValueError("a probe needs support images of at least two classes")
    if not bool(F.one_hot(y, ways).amax(1).all()):
        raise ValueError(f"support labels must be 0..{ways - 1} with every class present in every episode")
    return ways


class _Probe:
    "What the probes share: `fit(x, y)`, then `predict` and `predict_proba`."
    def fit(self,
            x,   # support features (E, n, D), or (n, D) for one episode
            y):  # their labels 0..W-1, (E, n) or (n,)
        "Fit to support features `x` and labels `y`; returns self."
        x, y, self.single = _episodes(x, y)
        self.ways, self.episodes = _n_classes(y), len(x)
        self._fit(x, y)
        return self

    def logits(self, x):  # query features (E, m, D), or (m, D) for one episode
        "Class scores (E, m, W) or (m, W) of query features `x`."
        # of the episodes the probe was fitted on
        if not hasattr(self, 'ways'): raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(support, labels) first")
        x, _, single = _episodes(x)
        if len(x) != self.episodes: raise ValueError(f"the probe was fitted on {self.episodes} episodes, got queries of {len(x)}")
        out = self._logits(x)
        return out[0] if single else out

    def predict_proba(self, x):  # query features (E, m, D), or (m, D)
        "Class probabilities of query features `x`."
        # (E, m, W), or (m, W) for one episode
        return self.logits(x).softmax(-1)

    def predict(self, x):  # query features (E, m, D), or (m, D)
        "Predicted class (0..W-1) of query features `x`."
        # (E, m), or (m,) for one episode
        return self.logits(x).argmax(-1)


class LogisticProbe(_Probe):
    "scikit-learn's logistic regression, for many episodes at once."
    # multinomial, with scikit-learn's objective: L2 on the weights, a free intercept
    def __init__(self,
                 C: float = 3.,          # inverse regularisation strength, as scikit-learn's `C`
                 tol: float = 1e-6,      # stop when every episode's largest gradient entry is below this
                 max_iter: int = 50,     # Newton steps at most
                 episodes_per_solve: int | None = None):  # solved together; None: 256 on the CPU (cache-sized), 4096 on a GPU
        self.C, self.tol, self.max_iter, self.episodes_per_solve = C, tol, max_iter, episodes_per_solve

    def _fit(self, x, y):
        # on a GPU the work is many small kernels, so more episodes a solve mean fewer launches
        n = self.episodes_per_solve or (256 if x.device.type == 'cpu' else 4096)
        W, b = zip(*[self._solve(*c) for c in zip(x.split(n), y.split(n))])
        self.W, self.b = torch.cat(W), torch.cat(b).to(x.dtype)

    def _logits(self, x):
        return torch.baddbmm(self.b[:, None], x, self.W.transpose(1, 2))

    def _solve(self, x, y):
        "Weights (E, W, D) and intercepts (E, W) of episodes `x` (E, n, D), labels `y` (E, n)."
        # the optimal weights lie in the span of the support features, as the penalty is on them alone: with the
        # Gram matrix x x^T = U L U^T, the same regression on z = U L^(1/2) has n numbers an image instead of D
        lam, u = torch.linalg.eigh((x @ x.transpose(1, 2)).double())
        lam = lam.clamp_min(0)
        z = u * lam.sqrt()[:, None]
        # scikit-learn fits two classes as one binomial model with C; the symmetric multinomial model with C/2 equals it
        theta = self._newton(z, lam, F.one_hot(y, self.ways).double(), self.C / 2 if self.ways == 2 else self.C)
        keep = lam > lam.amax(-1, keepdim=True) * 1e-10   # directions the features do not span carry no weight
        a = u * torch.where(keep, lam.clamp_min(1e-300).rsqrt(), 0)[:, None]
        return (theta[..., :-1] @ a.transpose(1, 2)).to(x.dtype) @ x, theta[..., -1]

    def _newton(self, z, lam, onehot, C):
        "Minimise C * cross-entropy + |V|^2 / 2 over theta = [V | b] (E, W, n+1)."
        # by Newton steps (preconditioned CG), with backtracking
        z = torch.cat([z, torch.ones_like(z[..., :1])], -1)   # the last coordinate, 1, carries the intercept
        free = torch.ones(z.shape[-1], dtype=z.dtype, device=z.device)
        free[-1] = 0   # the intercept is not penalised
        dot = lambda a, b: (a * b).sum((-1, -2), keepdim=True)
        def objective(th):
            logits = z @ th.transpose(1, 2)
            return C * (torch.logsumexp(logits, -1) - (logits * onehot).sum(-1)).sum(-1) + 0.5 * (th * th * free).sum((-1, -2))
        theta = z.new_zeros(len(z), onehot.shape[-1], z.shape[-1])
        for _ in range(self.max_iter):
            p = (z @ theta.transpose(1, 2)).softmax(-1)
            grad = C * (p - onehot).transpose(1, 2) @ z + theta * free
            if grad.abs().amax() < self.tol: break
            # Hessian-vector products need no Hessian: for each image, (diag(p) - p p^T) kron (z z^T)
            def hess(v):
                s = z @ v.transpose(1, 2)
                return C * (p * (s - (p * s).sum(-1, keepdim=True))).transpose(1, 2) @ z + v * free
            todo = grad.abs().amax((1, 2), keepdim=True) >= self.tol   # episodes that have converged take no step
            step = self._cg(hess, self._preconditioner(z, lam, p, C, free), grad, dot, todo)
            theta = theta + self._backtrack(objective, theta, step, dot(grad, step).flatten()) * step
        else:
            if grad.abs().amax() > 1e3 * self.tol:
                warnings.warn(f"LogisticProbe stopped after {self.max_iter} Newton steps with a gradient of "
                              f"{float(grad.abs().amax()):.2g}: raise max_iter")
        return theta

    @staticmethod
    def _preconditioner(z, lam, p, C, free):
        "Solves with Boehning's form of the Hessian."
        # c C (I - 11^T/W) kron z^T z + penalty, c the mean of p(1-p)
        # z^T z is diag(lam) bordered by the column sums of z: an arrow matrix, solved by its Schur complement
        c = C * (p * (1 - p)).mean((1, 2)).clamp_min(1e-3)[:, None]
        d = c * lam + 1                                    # (E, n)
        w = c * z[..., :-1].sum(1)                         # (E, n)
        schur = (c * z.shape[1] - (w * w / d).sum(-1, keepdim=True))[:, None]   # (E, 1, 1)
        d, w = d[:, None], w[:, None]
        def solve(r):
            mean = r.mean(1, keepdim=True)
            r = r - mean
            b = (r[..., -1:] - (w * r[..., :-1] / d).sum(-1, keepdim=True)) / schur
            return torch.cat([(r[..., :-1] - w * b) / d, b], -1) + mean * free
        return solve

    @staticmethod
    def _cg(hess, precond, grad, dot, todo):
        "An inexact Newton step for the episodes `todo`: preconditioned CG on H d = -grad."
        norm = dot(grad, grad).sqrt()
        target = norm * norm.sqrt().clamp(max=0.5)   # a residual of min(1/2, sqrt|grad|) |grad|
        d, r = torch.zeros_like(grad), -grad
        s = precond(r)
        q, rs = s, dot(r, s)
        for _ in range(grad[0].numel()):
            active = todo & (dot(r, r).sqrt() > target)
            if not active.any(): break
            hq = hess(q)
            alpha = torch.where(active, rs / dot(q, hq), 0)
            d, r = d + alpha * q, r - alpha * hq
            s = precond(r)
            rs, rs_old = dot(r, s), rs
            q = s + torch.where(active, rs / rs_old, 0) * q
        return d

    @staticmethod
    def _backtrack(objective, theta, step, slope, halvings: int = 12):
        "Per episode, the largest of 1, 1/2, 1/4 ... that lowers the objective enough."
        # enough: by Armijo's rule; the steps come as (E, 1, 1)
        f0, t = objective(theta), torch.ones_like(slope)
        for _ in range(halvings):
            bad = objective(theta + t[:, None, None] * step) > f0 + 1e-4 * t * slope
            if not bad.any(): break
            t = torch.where(bad, t / 2, t)
        return t[:, None, None]


class SklearnProbe(_Probe):
    "scikit-learn's `LogisticRegression`, one episode at a time."
    # on the CPU; LogisticRegression(penalty='l2', C=3, solver='lbfgs', max_iter=1000) with the defaults
    def __init__(self, C: float = 3.,         # inverse regularisation strength
                 max_iter: int = 1000):       # L-BFGS iterations at most
        self.C, self.max_iter = C, max_iter

    def _fit(self, x, y):
        from sklearn.linear_model import LogisticRegression
        # l1_ratio=0 is scikit-learn's spelling of penalty='l2' since 1.8
        self.device, self.dtype = x.device, x.dtype
        xs, ys = x.detach().cpu().double().numpy(), y.cpu().numpy()
        self.models = [LogisticRegression(C=self.C, l1_ratio=0., solver='lbfgs', max_iter=self.max_iter).fit(a, b)
                       for a, b in zip(xs, ys)]

    def _logits(self, x):
        # predict_log_proba gives logits up to a per-image constant, which softmax and argmax ignore
        out = np.stack([m.predict_log_proba(a) for m, a in zip(self.models, x.detach().cpu().double().numpy())])
        return torch.from_numpy(out).to(self.device, self.dtype)


class PrototypeProbe(_Probe):
    "Nearest class mean by cosine similarity."
    # the probabilities are the softmax of `scale` times the cosines
    def __init__(self, scale: float = 10.):   # temperature of the probabilities; predictions do not depend on it
        self.scale = scale

    def _fit(self, x, y):
        onehot = F.one_hot(y, self.ways).to(x.dtype)
        means = onehot.transpose(1, 2) @ F.normalize(x, dim=-1) / onehot.sum(1)[..., None]
        self.protos = F.normalize(means, dim=-1)

    def _logits(self, x):
        return self.scale * F.normalize(x, dim=-1) @ self.protos.transpose(1, 2)


PROBES = {'logistic': LogisticProbe, 'l2': LogisticProbe, 'sklearn': SklearnProbe, 'proto': PrototypeProbe,
          'prototype': PrototypeProbe}


def get_probe(probe='logistic',   # a name in `PROBES` (logistic or l2, sklearn, proto) or a probe
              C: float = 3.):     # inverse regularisation strength of the logistic probes
    "A new probe from its name; a probe object is returned as it is."
    if not isinstance(probe, str): return probe
    key = probe.lower()
    if key not in PROBES: raise ValueError(f"unknown probe {probe!r}: use one of {', '.join(PROBES)}")
    return PROBES[key]() if PROBES[key] is PrototypeProbe else PROBES[key](C=C)
