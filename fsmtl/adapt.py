"Test-time fine-tuning as P>M>F: a copy of the backbone tuned on each episode's supports."
from __future__ import annotations
import copy

import torch
import torch.nn.functional as F
from fastai.data.transforms import Normalize
from torch import nn

from .data.transforms import BatchColorJitter, BatchCropFlip, lee19_padding
from .data.tasks import shot_counts
from .distributed import gather_episodes, shard_episodes
from .evaluate import EpisodeScorer
from .features import _forward, extract_features, feature_model, model_device
from .runlog import with_bar

__all__ = ['scaled_padding', 'finetune_copy', 'finetuned_accuracy']


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
        f = F.normalize(_forward(model, x).flatten(1), dim=-1)
        protos = torch.zeros(int(y.max()) + 1, f.shape[1], device=device).index_add_(0, y, f)
    head = nn.Parameter(F.normalize(protos, dim=-1))
    opt = torch.optim.SGD([*model.parameters(), head], lr=lr, momentum=0.9)
    crop, jitter = BatchCropFlip(pad=scaled_padding(x.shape[-1])), BatchColorJitter()
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        if seed is not None: torch.manual_seed(seed)
        for _ in range(steps):
            a = crop.apply(raw, *crop.draw(len(raw), device))   # a fresh tensor, which the jitter changes in place
            a = (jitter.apply(a, *jitter.draw(len(a), device)) - m) / s
            logits = temperature * F.normalize(_forward(model, a).flatten(1), dim=-1) @ F.normalize(head, dim=-1).T
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p in model.parameters(): p.requires_grad_(False)
    return model


def finetuned_accuracy(model,              # a backbone, or a model with a `backbone`
                       dl,                 # an `EpisodeDL`: fixed episodes, class-major, supports first
                       shots=(1, 5),       # shot counts; each fine-tunes its own copy on its own supports
                       probe='logistic',   # a probe name for `get_probe`, or a probe
                       steps: int = 50,    # fine-tuning steps per episode
                       lr: float = 1e-3,   # fine-tuning learning rate
                       chunk: int = 256,   # images per forward pass
                       seed: int | None = None,  # fixes each episode's augmentation draws; None: the episodes' seed
                       progress: bool = False):  # show a progress bar
    "Per-episode query accuracy per shot count, each episode scored by a copy fine-tuned on its supports."
    backbone, counts = feature_model(model), shot_counts(shots)
    norm = next(t for t in dl.after_batch.fs if isinstance(t, Normalize))   # the loader's own normalisation
    mean, std = norm.mean.flatten().tolist(), norm.std.flatten().tolist()
    seed = dl.seed if seed is None else seed
    # under torch.distributed each process fine-tunes on its share of the episodes, each episode with its own seed
    dl = shard_episodes(dl)
    k = dl.shard[0] if getattr(dl, 'shard', None) is not None else 0
    scorers = {s: EpisodeScorer(dl.ways, dl.per_class, dl.queries, [s], probe) for s in counts}
    for x, _ in with_bar(dl, progress):
        for ep in x.as_subclass(torch.Tensor).view(-1, dl.ways, dl.per_class, *x.shape[1:]):
            for s in counts:
                sup = ep[:, :s].flatten(0, 1)
                y = torch.arange(dl.ways, device=sup.device).repeat_interleave(s)
                tuned = finetune_copy(backbone, sup, y, mean, std, steps, lr, seed=seed + k)
                scorers[s].add(extract_features(tuned, ep.flatten(0, 1), chunk))
            k += 1
    return gather_episodes({s: sc.result()[s] for s, sc in scorers.items()}, dl)
