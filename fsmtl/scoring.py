"Scoring fixed episodes: the `Scorer` interface, the probe's and the model's own head's, the one sharded loop, the results."
from __future__ import annotations
from abc import ABC, ABCMeta, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .data.tasks import EpisodeDL, position_labels, shot_counts, support_query
from .distributed import gather_episodes, shard_episodes, unwrap
from .features import extract_features
from .probe import get_probe
from .progress import with_bar

__all__ = ['Scorer', 'ProbeScorer', 'EpisodicModel', 'NativeScorer', 'score_episodes', 'EvalResult', 'EvalResults', 'ci95']


class Scorer(ABC):
    "Scores whole episodes: `add` a batch of their images; `result`, each episode's query accuracy."
    def __init__(self,
                 model,              # the model scored: a backbone, a model with a `backbone`, or a meta-learner's model
                 shots=(1, 5),       # shot counts; each uses the first supports of each class
                 chunk: int = 256):  # images a forward pass
        self.model, self.shots, self.chunk = model, shot_counts(shots), chunk

    def begin(self,
              dl):  # the episodes to score: an `EpisodeDL`, or this process's share of one
        "Get ready to score the episodes of `dl`, forgetting earlier ones."
        self.ways, self.per_class, self.queries = dl.ways, dl.per_class, dl.queries
        if self.queries < 1: raise ValueError(f"queries must be at least 1, got {self.queries}")
        if self.shots[-1] > self.per_class - self.queries:
            raise ValueError(f"the episodes have {self.per_class - self.queries} support images a class, fewer than "
                             f"{self.shots[-1]} shots")
        self.accs = {s: [] for s in self.shots}
        return self

    @abstractmethod
    def add(self,
            x):  # images of whole episodes (E*ways*per_class, C, H, W), class-major, supports first
        "Score a batch of whole episodes."

    def record(self,
               s: int,  # the shot count
               pred):   # predicted classes (E, ways*queries) of the queries of E episodes
        "Keep the query accuracy of each of these episodes at `s` shots."
        yq = position_labels(1, self.ways, self.queries, pred.device)
        self.accs[s].append((pred == yq).float().mean(1).cpu())

    def result(self) -> dict:
        "Per-episode accuracy of each shot count, of the episodes added so far."
        return {s: torch.cat(a).numpy() if a else np.zeros(0) for s, a in self.accs.items()}


class ProbeScorer(Scorer):
    "A probe fitted on each episode's support features and scored on its queries."
    # features are held until `group` rows, then the probe runs on all their episodes at once
    def __init__(self,
                 model,                  # a backbone, or a model with a `backbone`; None: `add_features` only
                 shots=(1, 5),           # shot counts; each uses the first supports of each class
                 probe='logistic',       # a probe name for `get_probe`, or a probe
                 chunk: int = 256,       # images a forward pass
                 group: int = 2 ** 15):  # feature rows held before the probe runs on their episodes: bounds memory
        super().__init__(model, shots, chunk)
        self.probe, self.group = probe, group

    def begin(self,
              dl):  # the episodes to score: an `EpisodeDL`, or this process's share of one
        "Get ready to score the episodes of `dl`, with no features held."
        self.held, self.rows = [], 0
        return super().begin(dl)

    def add(self,
            x):  # images of whole episodes (E*ways*per_class, C, H, W), class-major, supports first
        "Score a batch of whole episodes by the probe on their features."
        self.add_features(extract_features(self.model, x, self.chunk))

    def add_features(self,
                     f):  # L2-normalised features (E*ways*per_class, D) of whole episodes, in the order of their images
        "Score whole episodes from their features."
        self.held.append(f)
        self.rows += len(f)
        if self.rows >= self.group: self._score()

    def _score(self):
        f = torch.cat(self.held)
        self.held, self.rows = [], 0
        for s in self.shots:
            fs, fq = support_query(f, self.ways, self.per_class, s, self.queries)
            ys = position_labels(len(fs), self.ways, s, f.device)
            self.record(s, get_probe(self.probe).fit(fs, ys).predict(fq))

    def result(self) -> dict:
        "Per-episode accuracy of each shot count, the features still held scored first."
        if self.held: self._score()
        return super().result()


class EpisodicModel(nn.Module, metaclass=ABCMeta):
    "A model with an episodic head of its own: `predict_episodes`."
    # it predicts each episode's queries from that episode's support
    @abstractmethod
    def predict_episodes(self,
                         x,                  # images of whole episodes, class-major, supports first
                         ways: int,          # classes in an episode
                         per_class: int,     # images per class in an episode
                         queries: int,       # the last `queries` of each class are its queries
                         shots=(1, 5),       # shot counts; each uses the first supports of each class
                         chunk: int = 256):  # images per forward pass
        "Predicted classes (E, ways*queries) of each episode's queries, by shot count."


class NativeScorer(Scorer):
    "A meta-learner's own head (prototypes, ridge, SVM, MAML's adaptation) on each episode."
    # the model's `predict_episodes` gives the predicted classes of the queries of each shot count
    def __init__(self,
                 model,              # an `EpisodicModel`: a meta-learner's, which has `predict_episodes`
                 shots=(1, 5),       # shot counts; each uses the first supports of each class
                 chunk: int = 256):  # images a forward pass
        super().__init__(unwrap(model), shots, chunk)
        if not isinstance(self.model, EpisodicModel):
            raise ValueError("test_method='native' tests a meta-learner's own head: train with algorithm protonet, metaoptnet, "
                             "r2d2, anil or maml, or use a probe (l2, sklearn, proto)")

    def add(self,
            x):  # images of whole episodes (E*ways*per_class, C, H, W), class-major, supports first
        "Score a batch of whole episodes by the model's head."
        for s, pred in self.model.predict_episodes(x, self.ways, self.per_class, self.queries, self.shots, self.chunk).items():
            self.record(s, pred)


def score_episodes(scorer: Scorer,         # how each episode is scored
                   dl: EpisodeDL,          # fixed episodes, class-major, supports first: the same on every process
                   progress: bool = False  # show a progress bar
                   ) -> dict:              # per-episode accuracies by shot count, in the episodes' order
    "Each episode's query accuracy by `scorer`, one batch of whole episodes at a time."
    # under torch.distributed each process scores its share of the episodes, and all get every episode's accuracy
    dl = shard_episodes(dl)
    scorer.begin(dl)
    for x, _ in with_bar(dl, progress): scorer.add(x.as_subclass(torch.Tensor))
    return gather_episodes(scorer.result(), dl)


def ci95(accs  # accuracy of each episode
         ) -> float:
    "Half-width of the 95% confidence interval of the mean of `accs`."
    # 1.96 * std / sqrt(n), the std over the episodes
    accs = np.asarray(accs, dtype=np.float64)
    return float(1.96 * accs.std() / np.sqrt(len(accs)))


@dataclass
class EvalResult:
    "Accuracy of fixed episodes, shown as `77.72 ± 0.09%`."
    # `mean` and `ci95` are fractions, from the per-episode `accs`
    accs: np.ndarray = field(repr=False)   # accuracy of each episode, 0..1
    ways: int = 5                          # classes in an episode
    shots: int = 5                         # support images per class
    queries: int = 15                      # query images per class

    @property
    def mean(self) -> float: return float(np.mean(self.accs))
    @property
    def ci95(self) -> float: return ci95(self.accs)
    @property
    def episodes(self) -> int: return len(self.accs)

    def __repr__(self): return f"{100 * self.mean:.2f} ± {100 * self.ci95:.2f}%"
    def __str__(self): return f"{self.ways}-way {self.shots}-shot: {self!r} ({self.episodes} episodes)"


class EvalResults(dict):
    "`EvalResult`s by shot count, one line each."
    def __repr__(self): return '\n'.join(str(r) for r in self.values())

    @classmethod
    def of(cls, accs,  # per-episode accuracies by shot count
           dl):        # the `EpisodeDL` they were scored on
        "The results of per-episode accuracies `accs` on `dl`'s episodes."
        return cls({s: EvalResult(a, dl.ways, s, dl.queries) for s, a in accs.items()})
