"Test-time fine-tuning as P>M>F: a copy of the backbone tuned on each episode's supports."
from __future__ import annotations
import copy

import torch
import torch.nn.functional as F
from fastai.data.transforms import Normalize
from torch import nn

from .data.tasks import by_class, position_labels
from .data.transforms import BatchColorJitter, BatchCropFlip, lee19_padding
from .features import extract_features, feature_model, model_device, pooled_features
from .scoring import ProbeScorer, Scorer

__all__ = ['scaled_padding', 'finetune_copy', 'FinetuneScorer']


def scaled_padding(size: int  # side of the square images
                   ) -> int:
    "Lee19's crop padding scaled to `size` (21 at 224 px)."
    # 4 at 32 px, 8 at 84 px, 21 at 224 px
    return max(1, round(size * lee19_padding(size) / (32 if size <= 48 else 84)))


def finetune_copy(backbone: nn.Module,       # the trained backbone; it is left as it is
                  x: torch.Tensor,           # the support images (N, 3, H, W), normalised by `mean` and `std`
                  y: torch.Tensor,           # their labels 0..n_classes-1
                  mean,                      # per-channel mean the images were normalised with
                  std,                       # per-channel std the images were normalised with
                  steps: int = 50,           # optimiser steps, each on the whole support set, freshly augmented
                  lr: float = 1e-3,          # learning rate of SGD with momentum 0.9
                  temperature: float = 10.,  # scale of the cosine logits
                  seed: int | None = None):  # fixes the augmentation draws; None: the global generator's
    "A copy of `backbone` fine-tuned on `x`, `y` against a cosine head."
    # with Lee19 augmentation; the head starts at the class prototypes
    model = copy.deepcopy(backbone).eval()   # batch-norm statistics of a few support images would be noise: kept as trained
    for p in model.parameters(): p.requires_grad_(True)
    device = model_device(model)
    x, y = x.as_subclass(torch.Tensor).to(device), torch.as_tensor(y, device=device).long()
    m, s = (torch.tensor(v, device=device, dtype=x.dtype).view(1, -1, 1, 1) for v in (mean, std))
    raw = (x * s + m).clamp(0, 1)   # the augmentation works on pixels in 0..1, as in training
    with torch.no_grad():
        f = F.normalize(pooled_features(model, x).flatten(1), dim=-1)
        protos = torch.zeros(int(y.max()) + 1, f.shape[1], device=device).index_add_(0, y, f)
    head = nn.Parameter(F.normalize(protos, dim=-1))
    opt = torch.optim.SGD([*model.parameters(), head], lr=lr, momentum=0.9)
    crop, jitter = BatchCropFlip(pad=scaled_padding(x.shape[-1])), BatchColorJitter()
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        if seed is not None: torch.manual_seed(seed)
        for _ in range(steps):
            a = crop.apply(raw, *crop.draw(len(raw), device))   # a fresh tensor, which the jitter changes in place
            a = (jitter.apply(a, *jitter.draw(len(a), device)) - m) / s
            logits = temperature * F.normalize(pooled_features(model, a).flatten(1), dim=-1) @ F.normalize(head, dim=-1).T
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p in model.parameters(): p.requires_grad_(False)
    return model


class FinetuneScorer(Scorer):
    "A probe on the features of a copy of the backbone fine-tuned on each episode's supports (P>M>F)."
    # each shot count tunes its own copy on its own supports; each episode's augmentation has a seed of its own
    def __init__(self,
                 model,                    # a backbone, or a model with a `backbone`
                 shots=(1, 5),             # shot counts; each fine-tunes its own copy on its own supports
                 probe='logistic',         # a probe name for `get_probe`, or a probe
                 steps: int = 50,          # fine-tuning steps per episode
                 lr: float = 1e-3,         # fine-tuning learning rate
                 chunk: int = 256,         # images a forward pass
                 seed: int | None = None): # fixes episode k's augmentation draws by `seed + k`; None: the episodes' seed
        super().__init__(feature_model(model), shots, chunk)
        self.probe, self.steps, self.lr, self.seed = probe, steps, lr, seed

    def begin(self,
              dl):  # the episodes to score: an `EpisodeDL`, or this process's share of one
        "Get ready to score the episodes of `dl`, normalised as its batches are."
        super().begin(dl)
        norm = next(t for t in dl.after_batch.fs if isinstance(t, Normalize))   # the loader's own normalisation
        self.mean, self.std = norm.mean.flatten().tolist(), norm.std.flatten().tolist()
        # the seed of the next episode: `seed` plus its number among all the episodes, so that a process's share is tuned
        # as in one process
        first = dl.shard[0] if getattr(dl, 'shard', None) is not None else 0
        self.next_seed = (dl.seed if self.seed is None else self.seed) + first
        self.probes = {s: ProbeScorer(None, [s], self.probe).begin(dl) for s in self.shots}
        return self

    def add(self,
            x):  # images of whole episodes (E*ways*per_class, C, H, W), class-major, supports first
        "Score a batch of whole episodes, each by copies tuned on its supports."
        for ep in by_class(x, self.ways, self.per_class):
            for s in self.shots:
                tuned = finetune_copy(self.model, ep[:, :s].flatten(0, 1), position_labels(1, self.ways, s, x.device)[0],
                                      self.mean, self.std, self.steps, self.lr, seed=self.next_seed)
                self.probes[s].add_features(extract_features(tuned, ep.flatten(0, 1), self.chunk))
            self.next_seed += 1

    def result(self) -> dict:
        "Per-episode accuracy of each shot count, of the episodes added so far."
        return {s: p.result()[s] for s, p in self.probes.items()}
