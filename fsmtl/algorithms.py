"Meta-learners on MTL's `TaskDL` batches: ProtoNet, MetaOptNet, R2D2, ANIL and MAML."
from __future__ import annotations

import learn2learn as l2l
import torch
import torch.nn.functional as F
from fastcore.basics import store_attr
from fastcore.meta import delegates
from torch import nn

from .data.tasks import by_class, position_labels, support_query
from .features import extract_features
from .learner import MTLLearner, mtl_learner

__all__ = ['SOFTMAX_ALGORITHMS', 'META_ALGORITHMS', 'split_tasks', 'proto_logits', 'ridge_logits', 'svm_logits', 'EpisodeLoss',
           'FeatureHeadModel', 'MAMLModel', 'check_meta', 'meta_model', 'meta_learner']

# name -> what it trains: `mtl_learner`'s model, one head row a base class, by a softmax
SOFTMAX_ALGORITHMS = {'mtl': "over each training task's own classes (Wang et al. 2021)",
                      'pretrain': 'over all base classes, the tasks of a batch pooled (Baseline++, Chen et al. 2019; RFS, Tian et al. 2020)'}
# name -> what its episodic head is
META_ALGORITHMS = {'protonet': 'nearest class mean, squared Euclidean distance (Snell et al. 2017)',
                   'metaoptnet': "Crammer-Singer SVM on the support features, learn2learn's SVClassifier (Lee et al. 2019)",
                   'r2d2': 'closed-form ridge regression on one-hot targets (Bertinetto et al. 2019)',
                   'anil': 'MAML on the linear head only (Raghu et al. 2020)',
                   'maml': 'MAML on the whole network, learn2learn.algorithms.MAML (Finn et al. 2017)'}


def split_tasks(z,             # images or features of whole tasks (T*ways*per_class, ...), task-major and class-major
                ways: int,     # classes in a task
                shots: int,    # the first `shots` of each class are the support
                queries: int): # the next `queries` are the query
    "Support and query images or features of each task."
    # (T, ways*shots, ...) and (T, ways*queries, ...), split by position
    per_class = shots + queries
    if len(z) % (ways * per_class) or len(z) == 0:
        raise ValueError(f"a batch of {len(z)} items is not whole tasks of {ways} classes x {per_class} images (shots + queries)")
    return support_query(z, ways, per_class, shots, queries)


def proto_logits(support,      # support features (T, n, D)
                 labels,       # their labels 0..ways-1 (T, n)
                 query,        # query features (T, m, D)
                 ways: int):   # classes in a task
    "Minus squared Euclidean distances of queries to class means."
    # scores (T, m, ways)
    onehot = F.one_hot(labels, ways).to(support.dtype)
    means = onehot.transpose(1, 2) @ support / onehot.sum(1)[..., None]
    return -(query[:, :, None] - means[:, None]).pow(2).sum(-1)


def ridge_logits(support,              # support features (T, n, D)
                 labels,               # their labels 0..ways-1 (T, n)
                 query,                # query features (T, m, D)
                 ways: int,            # classes in a task
                 lam: float = 50.):    # the L2 weight (R2D2's lambda)
    "R2D2's scores (T, m, ways): ridge regression onto one-hot targets."
    onehot = F.one_hot(labels, ways).to(support.dtype)
    # solved in the support's n x n (Woodbury) form
    gram = support @ support.transpose(1, 2) + lam * torch.eye(support.shape[1], device=support.device, dtype=support.dtype)
    weights = support.transpose(1, 2) @ torch.linalg.solve(gram, onehot)   # (T, D, ways)
    return query @ weights


def _svclassifier():
    try: from learn2learn.nn import SVClassifier
    except ImportError as e:
        raise ImportError("metaoptnet's SVM head needs qpth (and cvxpy, which qpth imports): "
                          "pip install --no-deps qpth==0.0.18 && pip install cvxpy; or train with algorithm='r2d2'") from e
    return SVClassifier


def svm_logits(support,               # support features (T, n, D)
               labels,                # their labels 0..ways-1 (T, n)
               query,                 # query features (T, m, D)
               ways: int,             # classes in a task
               C: float = 0.1,        # the SVM's C (learn2learn's C_reg)
               max_iters: int = 15):  # iterations of the QP solver
    "Scores (T, m, ways) of MetaOptNet's multi-class SVM, one per task."
    # a learn2learn `SVClassifier`, a differentiable QP, per task
    SVClassifier = _svclassifier()
    return torch.stack([SVClassifier(s, y, ways, C_reg=C, max_iters=max_iters)(q)
                        for s, y, q in zip(support, labels, query)])


class EpisodeLoss(nn.Module):
    "Cross-entropy of query scores against their positions' labels."
    # scores (T*ways*queries, ways); `task_logits` as `MultiTaskLoss`'s
    def __init__(self,
                 ways: int,     # classes in a task
                 queries: int): # query images per class
        super().__init__()
        store_attr()

    def task_logits(self,
                    logits,  # query scores (T*ways*queries, ways)
                    y):      # the batch's global class ids (the labels follow from the positions)
        "The query scores and their labels 0..ways-1."
        logits = logits.as_subclass(torch.Tensor)
        tasks = len(logits) // (self.ways * self.queries)
        return logits, position_labels(tasks, self.ways, self.queries, logits.device).flatten()

    def forward(self, logits, y): return F.cross_entropy(*self.task_logits(logits, y))


class FeatureHeadModel(nn.Module):
    "A backbone and an episodic head: `proto`, `svm` or `ridge`."
    # `head` is the learned scale of the svm and ridge scores
    def __init__(self,
                 backbone: nn.Module,   # images to (N, D) features
                 ways: int,             # classes in a training task
                 shots: int,            # support images per class in a training task
                 queries: int,          # query images per class in a training task
                 head: str = 'proto',   # 'proto', 'svm' or 'ridge'
                 **head_kwargs):        # `svm_logits`'s C and max_iters, or `ridge_logits`'s lam
        super().__init__()
        self.backbone, self.ways, self.shots, self.queries, self.kind, self.head_kwargs = backbone, ways, shots, queries, head, head_kwargs
        self.head_fn = dict(proto=proto_logits, svm=svm_logits, ridge=ridge_logits)[head]
        # MetaOptNet's learned temperature: SVM and ridge scores lie about 1 apart, too flat for a softmax to train on
        self.head = nn.Parameter(torch.ones(0 if head == 'proto' else 1))

    def head_scores(self,
                    fs,          # support features (T, n, D)
                    ys,          # their labels (T, n)
                    fq,          # query features (T, m, D)
                    ways: int):  # classes in a task
        "The head's scores (T, m, ways) of the query features."
        # under mixed precision the backbone gives half floats: solves and distances are done in float32
        if fs.dtype in (torch.float16, torch.bfloat16): fs, fq = fs.float(), fq.float()
        out = self.head_fn(fs, ys, fq, ways, **self.head_kwargs)
        return out if self.kind == 'proto' else out * self.head

    def forward(self, x):  # images of whole tasks (T*ways*(shots+queries), C, H, W), class-major
        "Scores of each task's queries over its own classes (T*ways*queries, ways)."
        # all images go through the backbone at once
        fs, fq = split_tasks(self.backbone(x), self.ways, self.shots, self.queries)
        return self.head_scores(fs, position_labels(len(fs), self.ways, self.shots, x.device), fq, self.ways).flatten(0, 1)

    def predict_episodes(self,
                         x,                  # images of whole episodes, class-major, supports first
                         ways: int,          # classes in an episode
                         per_class: int,     # images per class in an episode
                         queries: int,       # the last `queries` of each class are its queries
                         shots=(1, 5),       # shot counts; each uses the first supports of each class
                         chunk: int = 256):  # images per forward pass
        "Predicted classes of each episode's queries, by shot count."
        # (E, ways*queries) per shot count, from the head on the trained features
        f, out = extract_features(self.backbone, x, chunk, normalize=False), {}
        with torch.no_grad():
            for s in shots:
                fs, fq = support_query(f, ways, per_class, s, queries)
                out[s] = self.head_scores(fs, position_labels(len(fs), ways, s, f.device), fq, ways).argmax(-1)
        return out


class _LinearHead(nn.Module):
    "A linear layer whose weight and bias are one (ways, D+1) parameter."
    # so that checkpoints keep them as one tensor
    def __init__(self, nf: int, ways: int):
        super().__init__()
        lin = nn.Linear(nf, ways)
        self.weight = nn.Parameter(torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1))

    def forward(self, f): return F.linear(f, self.weight[:, :-1], self.weight[:, -1])


class _Network(nn.Module):
    "A backbone, then a head."
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x): return self.head(self.backbone(x))


class MAMLModel(nn.Module):
    "A backbone and a linear head adapted per task by MAML or ANIL."
    # learn2learn's MAML adapts to each task's support, scored on its queries; ANIL (`head_only`) adapts the head alone
    def __init__(self,
                 backbone: nn.Module,            # images to (N, nf) features
                 nf: int,                        # the backbone's feature size
                 ways: int,                      # classes in a task: rows of the head
                 shots: int,                     # support images per class in a training task
                 queries: int,                   # query images per class in a training task
                 adaptation_steps: int = 1,      # gradient steps on the support
                 adaptation_lr: float = 0.5,     # their learning rate (learn2learn's fast_lr)
                 first_order: bool = False,      # no gradient through the adaptation's gradients
                 head_only: bool = False):       # ANIL: adapt the head only, the backbone is shared by all tasks
        super().__init__()
        store_attr('ways,shots,queries,adaptation_steps,adaptation_lr,first_order,head_only')
        self.maml = l2l.algorithms.MAML(_Network(backbone, _LinearHead(nf, ways)), lr=adaptation_lr, first_order=first_order)

    @property
    def backbone(self): return self.maml.module.backbone
    @property
    def head(self): return self.maml.module.head.weight

    def adapted_head(self,
                     fs,                 # support features (n, nf)
                     ys,                 # their labels (n,)
                     first_order=None):  # None: the model's `first_order`
        "A clone of the head after MAML steps on the support features."
        fo = self.first_order if first_order is None else first_order
        learner = l2l.algorithms.MAML(self.maml.module.head, lr=self.adaptation_lr, first_order=fo).clone()
        for _ in range(self.adaptation_steps): learner.adapt(F.cross_entropy(learner(fs), ys))
        return learner

    def adapt(self,
              xs,                 # support images (n, C, H, W)
              ys,                 # their labels (n,)
              first_order=None):  # None: the model's `first_order`
        "A network adapted to one task's support."
        # a MAML clone of the whole network, or (ANIL) the backbone and an adapted head
        if self.head_only: return _Network(self.backbone, self.adapted_head(self.backbone(xs), ys, first_order))
        learner = self.maml.clone(first_order=self.first_order if first_order is None else first_order)
        for _ in range(self.adaptation_steps): learner.adapt(F.cross_entropy(learner(xs), ys))
        return learner

    def forward(self, x):  # images of whole tasks (T*ways*(shots+queries), C, H, W), class-major
        "Scores (T*ways*queries, ways) of each task's queries, adapted to its support."
        ys = position_labels(1, self.ways, self.shots, x.device)[0]
        if self.head_only:   # the backbone sees the whole batch once; only the head is cloned per task
            fs, fq = split_tasks(self.backbone(x), self.ways, self.shots, self.queries)
            return torch.cat([self.adapted_head(s, ys)(q) for s, q in zip(fs, fq)])
        xs, xq = split_tasks(x, self.ways, self.shots, self.queries)
        return torch.cat([self.adapt(s, ys)(q) for s, q in zip(xs, xq)])

    def predict_episodes(self,
                         x,                  # images of whole episodes, class-major, supports first
                         ways: int,          # classes in an episode: the head's rows
                         per_class: int,     # images per class in an episode
                         queries: int,       # the last `queries` of each class are its queries
                         shots=(1, 5),       # shot counts; each uses the first supports of each class
                         chunk: int = 256):  # images per forward pass (ANIL's features)
        "Predicted classes of each episode's queries, by shot count."
        # (E, ways*queries) per shot count, after adapting to the episode's support, in eval mode, first order
        if ways != self.ways: raise ValueError(f"this {('ANIL' if self.head_only else 'MAML')} head has {self.ways} rows: test {self.ways}-way episodes")
        training = self.training
        self.eval()   # batch norm's running statistics and no DropBlock: a 1-shot support is too small to normalise by
        try:
            if self.head_only: x = extract_features(self.backbone, x, chunk, normalize=False)
            z, q = by_class(x, ways, per_class), support_query(x, ways, per_class, 1, queries)[1]
            out = {s: [] for s in shots}
            for e in range(len(z)):
                for s in shots:
                    ys = position_labels(1, ways, s, x.device)[0]
                    with torch.enable_grad():
                        learner = (self.adapted_head(z[e, :, :s].flatten(0, 1), ys, True) if self.head_only
                                   else self.adapt(z[e, :, :s].flatten(0, 1), ys, True))
                    with torch.no_grad(): out[s].append(learner(q[e]).argmax(-1))
        finally: self.train(training)
        return {s: torch.stack(p) for s, p in out.items()}


def check_meta(algorithm: str,               # a name of `META_ALGORITHMS` or `SOFTMAX_ALGORITHMS`
               shots: int = 5,               # support images per class in a training task
               queries: int = 5,             # query images per class in a training task
               adaptation_steps: int = 1,    # MAML/ANIL gradient steps on the support
               adaptation_lr: float = 0.5,   # their learning rate
               svm_C: float = 0.1,           # MetaOptNet's SVM C
               svm_max_iters: int = 15,      # MetaOptNet's QP iterations
               ridge_lambda: float = 50.,    # R2D2's L2 weight
               norm_train_features: bool = False):  # an MTL option
    "Fail early, with the fix, on options `algorithm` cannot train with."
    names = (*SOFTMAX_ALGORITHMS, *META_ALGORITHMS)
    if algorithm not in names: raise ValueError(f"unknown algorithm {algorithm!r}: use one of {', '.join(names)}")
    if algorithm in SOFTMAX_ALGORITHMS: return
    if shots < 1 or queries < 1:
        raise ValueError(f"{algorithm} splits each training task into support and query: train_shots ({shots}) and "
                         f"train_queries ({queries}) must both be at least 1")
    if norm_train_features: raise ValueError("norm_train_features is an option of algorithms mtl and pretrain only: leave it off")
    if algorithm in ('maml', 'anil'):
        if adaptation_steps < 1: raise ValueError(f"adaptation_steps must be at least 1 for {algorithm}, got {adaptation_steps}")
        if not adaptation_lr > 0: raise ValueError(f"adaptation_lr must be positive, got {adaptation_lr}")
    if algorithm == 'metaoptnet':
        if not svm_C > 0 or svm_max_iters < 1:
            raise ValueError(f"svm_C must be positive and svm_max_iters at least 1, got {svm_C} and {svm_max_iters}")
        _svclassifier()
    if algorithm == 'r2d2' and not ridge_lambda > 0: raise ValueError(f"ridge_lambda must be positive, got {ridge_lambda}")


def meta_model(algorithm: str,              # a name of `META_ALGORITHMS`
               backbone: nn.Module,         # images to (N, nf) features
               nf: int,                     # the backbone's feature size
               ways: int,                   # classes in a training task
               shots: int,                  # support images per class in a training task
               queries: int,                # query images per class in a training task
               adaptation_steps: int = 1,   # MAML/ANIL gradient steps on the support
               adaptation_lr: float = 0.5,  # their learning rate (learn2learn's fast_lr)
               first_order: bool = False,   # first-order MAML/ANIL
               svm_C: float = 0.1,          # MetaOptNet's SVM C
               svm_max_iters: int = 15,     # MetaOptNet's QP iterations
               ridge_lambda: float = 50.):  # R2D2's L2 weight
    "The model of `algorithm` around `backbone`."
    # it scores each task's queries from a batch of whole tasks
    check_meta(algorithm, shots, queries, adaptation_steps, adaptation_lr, svm_C, svm_max_iters, ridge_lambda)
    if algorithm in ('maml', 'anil'):
        return MAMLModel(backbone, nf, ways, shots, queries, adaptation_steps, adaptation_lr, first_order, algorithm == 'anil')
    kw = dict(svm=dict(C=svm_C, max_iters=svm_max_iters), ridge=dict(lam=ridge_lambda), proto={})
    head = dict(protonet='proto', metaoptnet='svm', r2d2='ridge')[algorithm]
    return FeatureHeadModel(backbone, ways, shots, queries, head, **kw[head])


@delegates(mtl_learner)
def meta_learner(dls,                          # DataLoaders from `mtl_dls`
                 algorithm: str = 'protonet',  # a name of `SOFTMAX_ALGORITHMS` or `META_ALGORITHMS`
                 shots: int | None = None,     # support images of a class in a training task; None: the `train_shots` of `mtl_dls`
                 adaptation_steps: int = 1,    # MAML/ANIL gradient steps on the support
                 adaptation_lr: float = 0.5,   # their learning rate (learn2learn's fast_lr)
                 first_order: bool = False,    # first-order MAML/ANIL
                 svm_C: float = 0.1,           # MetaOptNet's SVM C
                 svm_max_iters: int = 15,      # MetaOptNet's QP iterations
                 ridge_lambda: float = 50.,    # R2D2's L2 weight
                 **kwargs                      # passed to `mtl_learner`: arch, opt, lr, probe, precision ...
                 ) -> MTLLearner:
    "`mtl_learner` training by a meta-learning `algorithm` on the same task batches."
    if algorithm in SOFTMAX_ALGORITHMS: return mtl_learner(dls, all_classes=algorithm == 'pretrain', **kwargs)
    train = dls.train
    shots = getattr(dls, 'train_shots', None) if shots is None else shots
    if shots is None: raise ValueError("give shots=, the support images of a class in a training task")
    queries = train.per_class - shots
    check_meta(algorithm, shots, queries, adaptation_steps, adaptation_lr, svm_C, svm_max_iters, ridge_lambda,
               kwargs.get('norm_train_features', False))
    learn = mtl_learner(dls, **kwargs)
    backbone, nf = learn.model.backbone, learn.model.head.shape[1]
    learn.model = meta_model(algorithm, backbone, nf, train.ways, shots, queries, adaptation_steps, adaptation_lr, first_order,
                             svm_C, svm_max_iters, ridge_lambda)
    learn.loss_func = EpisodeLoss(train.ways, queries)
    return learn
