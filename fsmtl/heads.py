"The models and losses the algorithms train: MTL's head, episodic heads (prototypes, ridge, SVM), MAML and ANIL."
from __future__ import annotations
import math

import learn2learn as l2l
import torch
import torch.nn.functional as F
from fastcore.basics import store_attr
from torch import nn

from .data.tasks import by_class, local_labels, position_labels, support_query
from .features import extract_features
from .scoring import EpisodicModel

__all__ = ['MTLModel', 'MultiTaskLoss', 'BaseClassLoss', 'split_tasks', 'proto_logits', 'ridge_logits', 'svm_logits', 'svm_classifier',
           'EpisodeLoss', 'FeatureHeadModel', 'MAMLModel', 'ANILModel']


class MTLModel(nn.Module):
    "A backbone and a bias-free head with one row per base class."
    # it gives the logits of every base class for each image
    def __init__(self,
                 backbone: nn.Module,               # maps images to (N, num_features) features
                 num_features: int,                 # the backbone's feature size
                 n_base: int,                       # base (training) classes: rows of the head
                 ways: int = 5,                     # classes in a training task, for the original head's scale
                 norm_train_features: bool = False,  # L2-normalise features before the head
                 original_head: bool = False):      # the original code's random head, else zeros
        super().__init__()
        self.backbone, self.norm_train_features = backbone, norm_train_features
        head = torch.zeros(n_base, num_features)
        # zeros: every task starts at chance, loss ln(ways). The original code's kaiming-uniform times sqrt(n_base/ways)
        # starts unnormalised features at a loss several times that, and training stalled there (README, the MTL study)
        if original_head: head = nn.init.kaiming_uniform_(head, a=math.sqrt(5)) * math.sqrt(n_base / ways)
        self.head = nn.Parameter(head)

    def features(self, x):  # images (N, C, H, W)
        "The features the head sees, L2-normalised if `norm_train_features`."
        f = self.backbone(x)
        return F.normalize(f, dim=-1) if self.norm_train_features else f

    def forward(self, x):  # images (N, C, H, W)
        "Scores (N, n_base) of every base class: the features times the head."
        return F.linear(self.features(x), self.head)


class MultiTaskLoss(nn.Module):
    "The mean cross-entropy of each task over its own classes."
    # the mean over the batch's tasks, against labels local to each task
    def __init__(self,
                 ways: int,        # classes in a task
                 per_class: int):  # images per class in a task (shots + queries)
        super().__init__()
        self.ways, self.per_class = ways, per_class

    def task_logits(self,
                    logits,  # scores (N, n_base) of the batch's images
                    y):      # their global class ids, task-major and class-major
        "Each image's logits (N, ways) and label within its own task."
        y = y.as_subclass(torch.Tensor).long()
        n = self.ways * self.per_class
        if len(y) % n: raise ValueError(f"a batch of {len(y)} images is not whole tasks of {self.ways} x {self.per_class}")
        classes = by_class(y, self.ways, self.per_class)[:, :, 0]                 # (T, ways), in the task's order
        per_task = logits.as_subclass(torch.Tensor).view(len(classes), n, -1)       # (T, ways*per_class, n_base)
        own = per_task.gather(2, classes[:, None, :].expand(-1, n, -1)).flatten(0, 1)
        return own, local_labels(y, self.ways, self.per_class).long()

    def forward(self, logits, y):
        # tasks have equal sizes, so the mean over all images is the mean over tasks of each task's mean
        return F.cross_entropy(*self.task_logits(logits, y))


class BaseClassLoss(nn.Module):
    "Cross-entropy of one softmax over all base classes: pretraining, as Baseline++ and RFS train."
    def task_logits(self,
                    logits,  # scores (N, n_base) of the batch's images
                    y):      # their global class ids
        "The logits over all base classes and the global labels."
        # `task_acc` is then the accuracy over all base classes
        return logits.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor).long()

    def forward(self, logits, y): return F.cross_entropy(*self.task_logits(logits, y))



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


def svm_classifier():
    "learn2learn's `SVClassifier`; fails, naming the fix, without qpth and cvxpy."
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
    SVClassifier = svm_classifier()
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


class FeatureHeadModel(EpisodicModel):
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


class MAMLModel(EpisodicModel):
    "A backbone and a linear head adapted per task by MAML: learn2learn's MAML on the whole network."
    # adapted to each task's support, scored on its queries
    name = 'MAML'
    def __init__(self,
                 backbone: nn.Module,            # images to (N, nf) features
                 nf: int,                        # the backbone's feature size
                 ways: int,                      # classes in a task: rows of the head
                 shots: int,                     # support images per class in a training task
                 queries: int,                   # query images per class in a training task
                 adaptation_steps: int = 1,      # gradient steps on the support
                 adaptation_lr: float = 0.5,     # their learning rate (learn2learn's fast_lr)
                 first_order: bool = False):     # no gradient through the adaptation's gradients
        super().__init__()
        store_attr('ways,shots,queries,adaptation_steps,adaptation_lr,first_order')
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
        "A network adapted to one task's support: a MAML clone of the whole network."
        learner = self.maml.clone(first_order=self.first_order if first_order is None else first_order)
        for _ in range(self.adaptation_steps): learner.adapt(F.cross_entropy(learner(xs), ys))
        return learner

    def forward(self, x):  # images of whole tasks (T*ways*(shots+queries), C, H, W), class-major
        "Scores (T*ways*queries, ways) of each task's queries, adapted to its support."
        ys = position_labels(1, self.ways, self.shots, x.device)[0]
        xs, xq = split_tasks(x, self.ways, self.shots, self.queries)
        return torch.cat([self.adapt(s, ys)(q) for s, q in zip(xs, xq)])

    def episode_inputs(self,
                       x,           # images of whole episodes
                       chunk: int): # images per forward pass
        "What an episode's adaptation starts from: its images."
        return x

    def adapt_episode(self,
                      xs,   # one episode's support, as `episode_inputs` gives it
                      ys):  # its labels
        "A network adapted, first order, to one episode's support."
        return self.adapt(xs, ys, True)

    def predict_episodes(self,
                         x,                  # images of whole episodes, class-major, supports first
                         ways: int,          # classes in an episode: the head's rows
                         per_class: int,     # images per class in an episode
                         queries: int,       # the last `queries` of each class are its queries
                         shots=(1, 5),       # shot counts; each uses the first supports of each class
                         chunk: int = 256):  # images per forward pass (ANIL's features)
        "Predicted classes of each episode's queries, by shot count."
        # (E, ways*queries) per shot count, after adapting to the episode's support, in eval mode, first order
        if ways != self.ways: raise ValueError(f"this {self.name} head has {self.ways} rows: test {self.ways}-way episodes")
        training = self.training
        self.eval()   # batch norm's running statistics and no DropBlock: a 1-shot support is too small to normalise by
        try:
            x = self.episode_inputs(x, chunk)
            z, q = by_class(x, ways, per_class), support_query(x, ways, per_class, 1, queries)[1]
            out = {s: [] for s in shots}
            for e in range(len(z)):
                for s in shots:
                    ys = position_labels(1, ways, s, x.device)[0]
                    with torch.enable_grad(): learner = self.adapt_episode(z[e, :, :s].flatten(0, 1), ys)
                    with torch.no_grad(): out[s].append(learner(q[e]).argmax(-1))
        finally: self.train(training)
        return {s: torch.stack(p) for s, p in out.items()}


class ANILModel(MAMLModel):
    "MAML on the linear head only (ANIL)."
    # the backbone is shared by all tasks, only the head is cloned per task
    name = 'ANIL'
    def adapt(self,
              xs,                 # support images (n, C, H, W)
              ys,                 # their labels (n,)
              first_order=None):  # None: the model's `first_order`
        "A network adapted to one task's support: the backbone and an adapted head."
        return _Network(self.backbone, self.adapted_head(self.backbone(xs), ys, first_order))

    def forward(self, x):  # images of whole tasks (T*ways*(shots+queries), C, H, W), class-major
        "Scores (T*ways*queries, ways) of each task's queries, the head adapted to its support."
        # the backbone sees the whole batch once
        ys = position_labels(1, self.ways, self.shots, x.device)[0]
        fs, fq = split_tasks(self.backbone(x), self.ways, self.shots, self.queries)
        return torch.cat([self.adapted_head(s, ys)(q) for s, q in zip(fs, fq)])

    def episode_inputs(self,
                       x,           # images of whole episodes
                       chunk: int): # images per forward pass
        "What an episode's adaptation starts from: the features of its images."
        return extract_features(self.backbone, x, chunk, normalize=False)

    def adapt_episode(self,
                      fs,   # one episode's support features
                      ys):  # their labels
        "A head adapted, first order, to one episode's support features."
        return self.adapted_head(fs, ys, True)
