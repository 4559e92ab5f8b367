"The episodic test: a probe fitted and scored per episode; mean accuracy and 95% CI."
from __future__ import annotations
from dataclasses import dataclass, field

import numpy as np
import torch
from fastai.learner import Learner
from fastcore.basics import patch
from fastprogress.fastprogress import progress_bar

from .data.benchmarks import get_benchmark
from .data.block import episode_dl
from .data.core import FewShotSplits
from .data.tasks import EpisodeDL
from .distributed import gather_episodes, shard_episodes
from .features import extract_features, model_device
from .probe import get_probe
from .runlog import interactive

__all__ = ['EvalResult', 'EvalResults', 'EpisodeScorer', 'ci95', 'episodic_accuracy', 'evaluate']


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


class EpisodeScorer:
    "Scores episodes' features with a probe, batch by batch."
    def __init__(self,
                 ways: int,              # classes in an episode
                 per_class: int,         # images per class in an episode: supports first, then `queries`
                 queries: int,           # query images per class
                 shots=(1, 5),           # shot counts to score; each uses the first supports of each class
                 probe='logistic',       # a probe name for `get_probe`, or a probe
                 group: int = 2 ** 15):  # feature rows kept before the probe runs on their episodes
        self.ways, self.per_class, self.queries, self.probe, self.group = ways, per_class, queries, probe, group
        self.shots = [shots] if isinstance(shots, int) else list(shots)
        if not self.shots or min(self.shots) < 1: raise ValueError(f"shot counts must be at least 1, got {shots}")
        if queries < 1: raise ValueError(f"queries must be at least 1, got {queries}")
        if max(self.shots) > per_class - queries:
            raise ValueError(f"the episodes have {per_class - queries} support images a class, fewer than {max(self.shots)} shots")
        self.accs, self.held, self.rows = {s: [] for s in self.shots}, [], 0

    def add(self, features):  # features (n * ways * per_class, D) of whole episodes
        "Take the features of whole episodes, in the order of their images."
        self.held.append(features)
        self.rows += len(features)
        if self.rows >= self.group: self._score()

    def _score(self):
        f = torch.cat(self.held).view(-1, self.ways, self.per_class, self.held[0].shape[-1])
        self.held, self.rows = [], 0
        q = f[:, :, self.per_class - self.queries:].flatten(1, 2)
        yq = torch.arange(self.ways, device=f.device).repeat_interleave(self.queries)
        for s in self.shots:
            y = torch.arange(self.ways, device=f.device).repeat_interleave(s).expand(len(f), -1)
            pred = get_probe(self.probe).fit(f[:, :, :s].flatten(1, 2), y).predict(q)
            self.accs[s].append((pred == yq).float().mean(1).cpu())

    def result(self) -> dict:
        "Per-episode accuracy of each shot count."
        if self.held: self._score()
        return {s: torch.cat(a).numpy() if a else np.zeros(0) for s, a in self.accs.items()}


def episodic_accuracy(model,                     # a backbone, or a model with a `backbone`
                      dl,                        # an `EpisodeDL`: fixed episodes, class-major, supports first
                      shots=(1, 5),              # shot counts to score; each uses the first supports of a class
                      probe='logistic',          # a probe name for `get_probe`, or a probe
                      chunk: int = 256,          # images a forward pass
                      group: int = 2 ** 15,      # feature rows kept before the probe runs on their episodes
                      progress: bool = False):   # show a progress bar
    "Per-episode query accuracy of `dl`'s episodes for each shot count, all from one pass of feature extraction."
    dl = shard_episodes(dl)   # under torch.distributed each process scores its share; all get every episode's accuracy
    scorer = EpisodeScorer(dl.ways, dl.per_class, dl.queries, shots, probe, group)
    for x, _ in (progress_bar(dl, leave=False) if progress and interactive() else dl): scorer.add(extract_features(model, x, chunk))
    return gather_episodes(scorer.result(), dl)


def chunked_episode_dl(splits, split, ways, shots, queries, episodes, seed, chunk, device) -> EpisodeDL:
    "`episode_dl` with as many episodes a batch as fit in `chunk` images (one at least), on `device`."
    bs = max(1, chunk // (ways * (shots + queries)))
    return episode_dl(splits, split, ways, shots, queries, n=episodes, bs=bs, seed=seed, device=device)


def _episodes_source(data, split):
    "The `FewShotSplits` behind `data`: the splits themselves, `mtl_dls`'s DataLoaders, or a benchmark name."
    if isinstance(data, FewShotSplits): return data
    if isinstance(data, str): return get_benchmark(data)
    if hasattr(data, 'splits'): return data.splits
    raise TypeError(f"cannot take {split} episodes from {type(data).__name__}: pass FewShotSplits, "
                    "DataLoaders from mtl_dls, or a benchmark name")


# defined before the function it calls, so that the module's name `evaluate` stays that function
@patch
def evaluate(self: Learner,
             splits_or_dls=None,  # where the episodes come from; None: the learner's DataLoaders
             **kwargs):           # the options of `evaluate`: split, ways, shots, episodes, probe ...
    "The episodic test of this learner's backbone (see `evaluate`, defined below); episodes from its DataLoaders by default."
    return evaluate(self, splits_or_dls, **kwargs)


def evaluate(learn_or_model,                 # a `Learner`, a model with a `backbone`, or a backbone
             splits_or_dls=None,             # `FewShotSplits`, `mtl_dls`'s DataLoaders, or a benchmark name; None: the learner's
             split: str = 'test',            # 'test' for the final test, 'val' for validation classes
             ways: int = 5,                  # classes in an episode
             shots=(1, 5),                   # shot counts, all scored on the same episodes and query images
             queries: int = 15,              # query images of each class
             episodes: int = 2000,           # episodes
             probe='logistic',               # 'logistic' (= 'l2'), 'sklearn', 'proto', or a probe
             seed: int = 0,                  # fixes the episodes
             chunk: int = 256,               # images loaded and passed forward at once: bounds memory
             group: int = 2 ** 15,           # feature rows kept before the probe runs on their episodes: bounds memory
             progress: bool = True,          # show a progress bar
             finetune_steps: int = 0,        # fine-tune a copy of the backbone on each episode's supports first (P>M>F)
             finetune_lr: float = 1e-3):     # the learning rate of that fine-tuning
    "The episodic test of a backbone: an `EvalResult` (mean ± 95% CI) per shot count, an `EvalResults` when `shots` is a tuple."
    learn = learn_or_model if isinstance(learn_or_model, Learner) else None
    model = learn.model if learn is not None else learn_or_model
    if splits_or_dls is None:
        if learn is None: raise ValueError("pass the episodes' source: FewShotSplits, mtl_dls's DataLoaders, or a benchmark name")
        splits_or_dls = learn.dls
    splits = _episodes_source(splits_or_dls, split)
    counts = [shots] if isinstance(shots, int) else list(shots)
    if not counts or min(counts) < 1: raise ValueError(f"shot counts must be at least 1, got {shots}")
    dl = chunked_episode_dl(splits, split, ways, max(counts), queries, episodes, seed, chunk, model_device(model))
    if finetune_steps:
        from .adapt import finetuned_accuracy   # it builds on this module's scorer
        accs = finetuned_accuracy(model, dl, splits.mean, splits.std, shots, probe, finetune_steps, finetune_lr, chunk, seed,
                                  progress)
    else: accs = episodic_accuracy(model, dl, shots, probe=probe, chunk=chunk, group=group, progress=progress)
    results = EvalResults({s: EvalResult(a, ways, s, queries) for s, a in accs.items()})
    return results if not isinstance(shots, int) else results[shots]
