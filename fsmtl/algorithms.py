"The algorithms, one registry: each trains a backbone on `TaskDL` batches with its own options, check, model, loss and head."
from __future__ import annotations
from abc import ABC, abstractmethod

from torch import nn

from .probe import get_probe

from .heads import (ANILModel, BaseClassLoss, EpisodeLoss, FeatureHeadModel, MAMLModel, MTLModel, MultiTaskLoss,
                    svm_classifier)

__all__ = ['Algorithm', 'ALGORITHMS', 'register_algorithm', 'algorithm_options', 'get_algorithm', 'MTL', 'Pretrain', 'Episodic',
           'ProtoNet', 'MetaOptNet', 'R2D2', 'MAML', 'ANIL']

# name -> the `Algorithm` class of that name, in the order registered
ALGORITHMS = {}


def register_algorithm(cls):  # a subclass of `Algorithm`, with its `name`
    "Add `cls` to `ALGORITHMS`: `train(algorithm=cls.name)` and `fsmtl train --algorithm` then train it."
    ALGORITHMS[cls.name] = cls
    return cls


def algorithm_options() -> dict:
    "The options of every registered algorithm: name -> (default, help), as its first owner declares it."
    options = {}
    for cls in ALGORITHMS.values():
        for k, v in cls.options.items(): options.setdefault(k, v)
    return options


def _owners(option: str) -> str:
    return ' and '.join(n for n, cls in ALGORITHMS.items() if option in cls.options)


class Algorithm(ABC):
    "A way to train a backbone on task batches: its options, check, model, loss and episodic head."
    name: str = ''         # its name in `ALGORITHMS`, `train(algorithm=...)` and `--algorithm`
    about: str = ''        # what it trains, one line
    options: dict = {}     # its own options: name -> (default, help), options of `train` and flags of `fsmtl train`
    least: dict = {}       # the least value of its numeric options: name -> value
    positive: tuple = ()   # its options that must be above 0
    needs: tuple = ()      # functions that raise, naming the fix, when a package it needs is missing
    forbids: tuple = ()    # other algorithms' options it refuses when they are set
    native: bool = False   # whether it splits each task into support and query, and its model has an episodic head
                           # of its own (`predict_episodes`, `test_method='native'`)
    pooled: bool = False   # whether it trains on images drawn from all base classes at random (`TaskDL(pooled=True)`)
                           # rather than on tasks of a few classes
    may_leave_unused: bool = True  # whether a training step may leave parameters of its model without a gradient (several
                                   # processes then look for them: DDP's find_unused_parameters)

    def __init__(self, **options):  # values of its `options`; the others keep their defaults
        unknown = [k for k in options if k not in self.options]
        if unknown: raise TypeError(f"{self.name} has no option {', '.join(unknown)}; its options: {', '.join(self.options) or 'none'}")
        for k, (default, _) in self.options.items(): setattr(self, k, options.get(k, default))

    @classmethod
    def of(cls, options: dict):  # options by name, of this algorithm or any other
        "The algorithm with its own options taken from `options`; fails on an option it forbids."
        for k in cls.forbids:
            if options.get(k): raise ValueError(f"{k} is an option of algorithms {_owners(k)} only: leave it off")
        return cls(**{k: options[k] for k in cls.options if k in options})

    def check(self,
              shots: int,    # support images per class in a training task
              queries: int): # query images per class in a training task
        "Fail early, with the fix, on options or task sizes it cannot train with; once for each task size."
        if getattr(self, '_checked', None) == (shots, queries): return   # `train` checks it, then `mtl_learner`
        if self.native and (shots < 1 or queries < 1):
            raise ValueError(f"{self.name} splits each training task into support and query: train_shots ({shots}) and "
                             f"train_queries ({queries}) must both be at least 1")
        for k, v in self.least.items():
            if getattr(self, k) < v: raise ValueError(f"{k} must be at least {v} for {self.name}, got {getattr(self, k)}")
        for k in self.positive:
            if not getattr(self, k) > 0: raise ValueError(f"{k} must be positive for {self.name}, got {getattr(self, k)}")
        for need in self.needs: need()
        self._checked = (shots, queries)

    @abstractmethod
    def model(self,
              backbone: nn.Module,  # images to (N, nf) features
              nf: int,              # the backbone's feature size
              n_base: int,          # base (training) classes
              ways: int,            # classes in a training task
              shots: int,           # support images per class in a training task
              queries: int          # query images per class in a training task
              ) -> nn.Module:       # it scores a batch of whole tasks; has a `backbone` and a `head`
        "The model it trains around `backbone`."

    @abstractmethod
    def loss(self,
             ways: int,      # classes in a training task
             shots: int,     # support images per class in a training task
             queries: int    # query images per class in a training task
             ) -> nn.Module: # takes the model's scores and the batch's global class ids
        "The loss it trains with."

    def test_probe(self,
                   method: str,  # a probe's name (`get_probe`'s), or 'native': its own episodic head
                   C: float):    # the logistic regression probe's C
        "The probe of the test method `method`, or 'native'."
        if method != 'native': return get_probe(method, C)
        if not self.native:
            raise ValueError(f"test_method native is a meta-learner's own head: with algorithm {self.name} use l2, sklearn or proto")
        return method

    def val_probe(self,
                  method: str,  # the test method
                  C: float):    # the logistic regression probe's C
        "The probe of the validation episodes: the test's, or l2 for a native test."
        return get_probe('l2' if method == 'native' else method, C)

    def __repr__(self): return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self.options)})"


_MTL_OPTIONS = {
    'norm_train_features': (False, 'mtl, pretrain: L2-normalise features before the head in training'),
    'original_head': (False, 'mtl, pretrain: the original code\'s random head (kaiming-uniform times sqrt(base classes / '
                             'train_ways)); default: zeros, every task starting at chance'),
}


@register_algorithm
class MTL(Algorithm):
    "Multi-task learning: one head row a base class, each task scored by a softmax over its own classes."
    name, about, options = 'mtl', "softmax over each training task's own classes (Wang et al. 2021)", _MTL_OPTIONS
    all_classes = False        # one softmax over all base classes instead
    may_leave_unused = False   # every step trains the backbone and the head rows of its tasks' classes

    def model(self,
              backbone: nn.Module,  # images to (N, nf) features
              nf: int,              # the backbone's feature size
              n_base: int,          # base classes: rows of the head
              ways: int,            # classes in a training task, for the original head's scale
              shots: int,           # support images per class in a training task
              queries: int          # query images per class in a training task
              ) -> MTLModel:
        "`MTLModel`: the features times one head row a base class."
        return MTLModel(backbone, nf, n_base, ways, self.norm_train_features, self.original_head)

    def loss(self,
             ways: int,      # classes in a training task
             shots: int,     # support images per class in a training task
             queries: int):  # query images per class in a training task
        "`MultiTaskLoss` over each task's own classes, or `BaseClassLoss` over all of them."
        return BaseClassLoss() if self.all_classes else MultiTaskLoss(ways, shots + queries)


@register_algorithm
class Pretrain(MTL):
    "Pretraining: MTL's model, one softmax over all base classes."
    name, all_classes, pooled = 'pretrain', True, True
    about = 'softmax over all base classes, on batches of images drawn at random (Baseline++, Chen et al. 2019; RFS, Tian et al. 2020)'


class Episodic(Algorithm):
    "A meta-learner: a head built from each task's support scores its queries."
    # the support: the first `shots` images of each class of a task; the queries: the rest
    forbids, native = tuple(_MTL_OPTIONS), True
    head: str = 'proto'   # `FeatureHeadModel`'s head: 'proto', 'svm' or 'ridge'
    head_options = {}     # the head's keyword arguments: name -> the option that gives it

    def model(self,
              backbone: nn.Module,  # images to (N, nf) features
              nf: int,              # the backbone's feature size
              n_base: int,          # base classes (not used: the head is built from each task's support)
              ways: int,            # classes in a training task
              shots: int,           # support images per class in a training task
              queries: int          # query images per class in a training task
              ) -> nn.Module:
        "`FeatureHeadModel` with its `head`."
        return FeatureHeadModel(backbone, ways, shots, queries, self.head,
                                **{k: getattr(self, o) for k, o in self.head_options.items()})

    def loss(self,
             ways: int,      # classes in a training task
             shots: int,     # support images per class in a training task
             queries: int):  # query images per class in a training task
        "`EpisodeLoss`: the cross-entropy of the queries' scores."
        return EpisodeLoss(ways, queries)


@register_algorithm
class ProtoNet(Episodic):
    "Prototypical networks: the nearest class mean."
    name, about = 'protonet', 'nearest class mean, squared Euclidean distance (Snell et al. 2017)'


@register_algorithm
class MetaOptNet(Episodic):
    "MetaOptNet: a multi-class SVM on the support features."
    name, about = 'metaoptnet', "Crammer-Singer SVM on the support features, learn2learn's SVClassifier (Lee et al. 2019)"
    options = {'svm_C': (0.1, 'metaoptnet: C of the SVM head'),
               'svm_max_iters': (15, 'metaoptnet: iterations of the SVM\'s QP solver')}
    least, positive, needs = {'svm_max_iters': 1}, ('svm_C',), (svm_classifier,)
    head, head_options = 'svm', {'C': 'svm_C', 'max_iters': 'svm_max_iters'}


@register_algorithm
class R2D2(Episodic):
    "R2D2: ridge regression on one-hot targets, in closed form."
    name, about = 'r2d2', 'closed-form ridge regression on one-hot targets (Bertinetto et al. 2019)'
    options, positive = {'ridge_lambda': (50., 'r2d2: L2 weight of the ridge regression head')}, ('ridge_lambda',)
    head, head_options = 'ridge', {'lam': 'ridge_lambda'}


@register_algorithm
class MAML(Episodic):
    "MAML: the whole network adapted to each task's support by gradient steps."
    name, about = 'maml', 'MAML on the whole network, learn2learn.algorithms.MAML (Finn et al. 2017)'
    options = {'adaptation_steps': (1, 'maml, anil: gradient steps on each task\'s support'),
               'adaptation_lr': (0.5, 'maml, anil: learning rate of those steps (learn2learn\'s fast_lr)'),
               'first_order': (False, 'maml, anil: first-order approximation (no gradient through the adaptation)')}
    least, positive = {'adaptation_steps': 1}, ('adaptation_lr',)
    network = MAMLModel   # the model: what it adapts

    def model(self,
              backbone: nn.Module,  # images to (N, nf) features
              nf: int,              # the backbone's feature size
              n_base: int,          # base classes (not used: the head has a row a task's class)
              ways: int,            # classes in a training task: rows of the head
              shots: int,           # support images per class in a training task
              queries: int          # query images per class in a training task
              ) -> MAMLModel:
        "Its `network` with a linear head, adapted per task."
        return self.network(backbone, nf, ways, shots, queries, self.adaptation_steps, self.adaptation_lr, self.first_order)


@register_algorithm
class ANIL(MAML):
    "ANIL: MAML on the linear head only."
    name, about, network = 'anil', 'MAML on the linear head only (Raghu et al. 2020)', ANILModel


def get_algorithm(name,      # a name of `ALGORITHMS`, or an `Algorithm`
                  **options  # options of any registered algorithm; only its own are used
                  ) -> Algorithm:  # its options set
    "The algorithm `name` with its options."
    if isinstance(name, Algorithm):
        if options: raise TypeError(f"give {', '.join(options)} to the algorithm itself: {type(name).__name__}({', '.join(options)}=...)")
        return name
    if name not in ALGORITHMS: raise ValueError(f"unknown algorithm {name!r}: use one of {', '.join(ALGORITHMS)}")
    known = algorithm_options()
    if unknown := [k for k in options if k not in known]:
        raise TypeError(f"unknown algorithm option(s) {', '.join(unknown)}: the registered algorithms take {', '.join(known)}")
    return ALGORITHMS[name].of(options)
