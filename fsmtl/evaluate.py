"The episodic test: its episodes, the scorer of its method, and each shot count's mean accuracy and 95% CI."
from __future__ import annotations

import torch
from fastai.learner import Learner
from fastcore.basics import patch_to

from .adapt import FinetuneScorer
from .data.benchmarks import get_benchmark
from .data.block import episode_dl
from .data.core import FewShotSplits
from .data.tasks import EpisodeDL, shot_counts
from .features import model_device
from .scoring import EvalResults, NativeScorer, ProbeScorer, Scorer, score_episodes

__all__ = ['get_scorer', 'episode_loader', 'evaluate']


def get_scorer(model,                     # a backbone, a model with a `backbone`, or a meta-learner's model
               shots=(1, 5),              # shot counts to score
               probe='logistic',          # 'logistic' (= 'l2'), 'sklearn', 'proto' or a probe; 'native': the model's own head
               chunk: int = 256,          # images a forward pass
               group: int = 2 ** 15,      # feature rows held before a probe runs on their episodes
               finetune_steps: int = 0,   # fine-tune a copy of the backbone on each episode's supports first (P>M>F)
               finetune_lr: float = 1e-3  # the learning rate of that fine-tuning
               ) -> Scorer:
    "The `Scorer` of a test method: a probe, fine-tuning then a probe, or the model's own head."
    if isinstance(probe, str) and probe.lower() == 'native':
        if finetune_steps: raise ValueError("the native test scores a meta-learner's own head, not a fine-tuned backbone: "
                                            "leave finetune_steps at 0, or use a probe (l2, sklearn, proto)")
        return NativeScorer(model, shots, chunk)
    if finetune_steps: return FinetuneScorer(model, shots, probe, finetune_steps, finetune_lr, chunk)
    return ProbeScorer(model, shots, probe, chunk, group)


def _episodes_source(data, split):
    "The `FewShotSplits` behind `data`: the splits themselves, `mtl_dls`'s DataLoaders, or a benchmark name."
    if isinstance(data, FewShotSplits): return data
    if isinstance(data, str): return get_benchmark(data)
    if hasattr(data, 'splits'): return data.splits
    raise TypeError(f"cannot take {split} episodes from {type(data).__name__}: pass an EpisodeDL, FewShotSplits, "
                    "DataLoaders from mtl_dls, or a benchmark name")


# what `episode_loader` draws when neither the caller nor a loader says otherwise
DRAW = dict(ways=5, queries=15, n=2000, seed=0)


def episode_loader(source,                 # an `EpisodeDL`, `mtl_dls`'s DataLoaders, `FewShotSplits` or a benchmark name
                   split: str = 'test',    # DataLoaders: 'val' is `dls.valid`, 'test' `dls[2]`; else the split to draw
                   shots: int = 5,         # the most support images per class that will be scored
                   device=None,            # the device of the model; None: the loader's, or fastai's default
                   chunk: int = 256,       # images per batch at most, for episodes drawn here
                   ways: int | None = None,     # classes per episode; None: the loader's, else 5
                   queries: int | None = None,  # query images per class; None: the loader's, else 15
                   n: int | None = None,        # episodes; None: the loader's, else 2000
                   seed: int | None = None      # fixes the episodes; None: the loader's, else 0
                   ) -> EpisodeDL:
    "The episodes to score: the DataLoaders' own when they fit, else drawn from the benchmark."
    asked = {k: v for k, v in dict(ways=ways, queries=queries, n=n, seed=seed).items() if v is not None}
    split = 'val' if split == 'valid' else split
    dl = source if isinstance(source, EpisodeDL) else _loader(source, split)
    if dl is not None:
        have = dict(ways=dl.ways, queries=dl.queries, n=len(dl.episodes), seed=dl.seed)
        fits = dl.shots >= shots and all(have[k] == v for k, v in asked.items())
        if fits and (device is None or _same_device(dl.device, device)): return dl
        if isinstance(source, EpisodeDL):
            raise ValueError(f"these episodes are {dl.ways}-way with {dl.shots} shots, {dl.queries} queries, {have['n']} "
                             f"of them (seed {dl.seed}), on {dl.device}: they cannot give {shots} shots, {asked} on {device}")
        # the loader's own settings where none is asked, and its supports: the same episodes for the same seed
        asked, shots = {**have, **asked}, max(shots, dl.shots)
    return episode_dl(_episodes_source(source, split), split, shots=shots, device=device, chunk=chunk, **{**DRAW, **asked})


def _loader(dls, split):
    "`mtl_dls`'s own `EpisodeDL` of `split` ('val' is `dls.valid`, 'test' `dls[2]`), or None."
    loaders = getattr(dls, 'loaders', None)
    if not loaders or split not in ('val', 'test'): return None
    k = 1 if split == 'val' else 2
    dl = loaders[k] if len(loaders) > k else None
    return dl if isinstance(dl, EpisodeDL) else None


def _same_device(a, b) -> bool:
    a, b = torch.device(a or 'cpu'), torch.device(b)
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def evaluate(learn_or_model,                 # a `Learner`, a model with a `backbone`, or a backbone
             source=None,                    # an `EpisodeDL`, `mtl_dls`'s DataLoaders, `FewShotSplits` or a benchmark name
             split: str = 'test',            # 'test' for the final test, 'val' for validation classes
             ways: int | None = None,        # classes per episode; None: the loader's, else 5
             shots=(1, 5),                   # shot counts, all scored on the same episodes and query images
             queries: int | None = None,     # query images per class; None: the loader's, else 15
             episodes: int | None = None,    # episodes; None: the loader's, else 2000
             probe='logistic',               # 'logistic' (= 'l2'), 'sklearn', 'proto', a probe; 'native': a meta-learner's own head
             seed: int | None = None,        # fixes the episodes; None: the loader's, else 0
             chunk: int = 256,               # images loaded and passed forward at once: bounds memory
             group: int = 2 ** 15,           # feature rows kept before the probe runs on their episodes: bounds memory
             progress: bool = True,          # show a progress bar
             finetune_steps: int = 0,        # fine-tune a copy of the backbone on each episode's supports first (P>M>F)
             finetune_lr: float = 1e-3):     # the learning rate of that fine-tuning
    "The episodic test of a model: mean ± 95% CI per shot count."
    learn = learn_or_model if isinstance(learn_or_model, Learner) else None
    model = learn.model if learn is not None else learn_or_model
    if source is None:
        if learn is None: raise ValueError("pass the episodes' source: an EpisodeDL, FewShotSplits, mtl_dls's DataLoaders, "
                                           "or a benchmark name")
        source = learn.dls
    counts = shot_counts(shots)
    scorer = get_scorer(model, counts, probe, chunk, group, finetune_steps, finetune_lr)   # fails before any episode is drawn
    dl = episode_loader(source, split, counts[-1], model_device(model), chunk, ways=ways, queries=queries, n=episodes,
                        seed=seed)
    results = EvalResults.of(score_episodes(scorer, dl, progress), dl)
    return results if not isinstance(shots, int) else results[shots]


def _learner_evaluate(self: Learner,
                      source=None,  # where the episodes come from; None: the learner's DataLoaders
                      **kwargs):    # the options of `evaluate`: split, shots, probe, episodes ...
    "The episodic test of this learner's model (see `evaluate`); its DataLoaders' test episodes by default."
    return evaluate(self, source, **kwargs)


patch_to(Learner, nm='evaluate')(_learner_evaluate)   # `Learner.evaluate`
