"Lee19 augmentation (random crop with padding, colour jitter, horizontal flip) as fastai batch transforms that run on the batch's device."
from __future__ import annotations
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from fastai.vision.core import TensorImage
from fastai.data.transforms import IntToFloatTensor, Normalize
from fasttransform import Transform

__all__ = ['JitterParams', 'Lee19Augment', 'lee19_padding', 'lee19_tfms', 'rgb_to_gray']

# torchvision's ColorJitter order of operations; hue is off in Lee19, so only these three are drawn
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2


def lee19_padding(size: int) -> int:
    "Zero padding of Lee19's random crop: 4 for CIFAR-sized images (32), 8 for ImageNet-sized ones (84)."
    return 4 if size <= 48 else 8


def rgb_to_gray(x):
    "Luma of a float batch (B, 3, H, W) with torchvision's weights, shape (B, 1, H, W)."
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(a, b, f):
    "torchvision's `_blend` for images in 0..1, with one factor per image."
    f = f.view(-1, 1, 1, 1)
    return (f * a + (1 - f) * b).clamp(0, 1)


@dataclass
class JitterParams:
    "Per-image random draws of one Lee19 batch; every field has the batch size as first dimension."
    top: torch.Tensor       # crop offset in rows of the padded image, 0..2*pad
    left: torch.Tensor      # crop offset in columns of the padded image, 0..2*pad
    factors: torch.Tensor   # (B, 3) brightness, contrast and saturation factors
    order: torch.Tensor     # (B, 3) the order of those three operations, a permutation of 0, 1, 2
    flip: torch.Tensor      # (B,) bool, mirror left-right


class Lee19Augment(Transform):
    "Lee19's training augmentation on a float batch in 0..1, drawn per image, computed for the whole batch at once."
    order, split_idx = 15, 0  # after IntToFloatTensor (10), before Normalize (99); training batches only

    def __init__(self,
                 pad: int = 4,          # zero padding of the random crop, on each side
                 jitter: float = 0.4,   # brightness, contrast and saturation factors are drawn from [1-jitter, 1+jitter]
                 flip_p: float = 0.5):  # probability of a horizontal flip
        super().__init__()
        self.pad, self.jitter, self.flip_p = pad, jitter, flip_p

    def draw(self, n: int, device=None) -> JitterParams:
        "Random parameters for `n` images, drawn as torchvision's RandomCrop, ColorJitter and RandomHorizontalFlip do."
        offsets = torch.randint(0, 2 * self.pad + 1, (2, n), device=device)
        factors = torch.empty(n, 3, device=device).uniform_(1 - self.jitter, 1 + self.jitter)
        order = torch.rand(n, 3, device=device).argsort(dim=1)
        flip = torch.rand(n, device=device) < self.flip_p
        return JitterParams(offsets[0], offsets[1], factors, order, flip)

    def apply(self, x, p: JitterParams):
        "Augment batch `x` (B, 3, H, W) with parameters `p`."
        x = self.crop(x, p.top, p.left)
        x = self.color_jitter(x, p.factors, p.order)
        return torch.where(p.flip.view(-1, 1, 1, 1), x.flip(-1), x)

    def crop(self, x, top, left):
        "Zero-pad by `pad` and cut an HxW window at (`top`, `left`) from each image."
        b, _, h, w = x.shape
        xp = F.pad(x, (self.pad,) * 4)
        rows = (top.view(-1, 1) + torch.arange(h, device=x.device)).view(b, h, 1)
        cols = (left.view(-1, 1) + torch.arange(w, device=x.device)).view(b, 1, w)
        # advanced indexing puts the broadcast (B, H, W) dims first, then the channel slice
        return xp[torch.arange(b, device=x.device).view(b, 1, 1), :, rows, cols].permute(0, 3, 1, 2)

    def color_jitter(self, x, factors, order):
        "Brightness, contrast and saturation, each image in its own order."
        x = x.clone()
        for step in range(3):
            for op in (BRIGHTNESS, CONTRAST, SATURATION):
                idx = (order[:, step] == op).nonzero().flatten()
                if len(idx): x[idx] = self._adjust(op, x[idx], factors[idx, op])
        return x

    @staticmethod
    def _adjust(op, x, f):
        if op == BRIGHTNESS: return _blend(x, torch.zeros_like(x), f)
        if op == CONTRAST: return _blend(x, rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True), f)
        return _blend(x, rgb_to_gray(x), f)

    def encodes(self, x: TensorImage):
        return TensorImage(self.apply(x, self.draw(len(x), x.device)))


def lee19_tfms(size: int,              # side of the square images
               mean, std,              # per-channel statistics of the benchmark, images in 0..1
               augment: bool = True):  # add the training augmentation
    "The batch transforms of a benchmark: to float, Lee19 augmentation (training only), normalisation."
    tfms = [IntToFloatTensor()]
    if augment: tfms.append(Lee19Augment(pad=lee19_padding(size)))
    return tfms + [Normalize.from_stats(mean, std, cuda=False)]
