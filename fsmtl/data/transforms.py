"Lee19 augmentation as fastai batch transforms, run on the batch's device."
from __future__ import annotations

import torch
import torch.nn.functional as F
from fastai.data.transforms import IntToFloatTensor, Normalize
from fastai.vision.core import TensorImage
from fasttransform import Transform

from .core import InputSpec

__all__ = ['BatchCropFlip', 'BatchColorJitter', 'BatchResize', 'NormalizeInPlace', 'lee19_padding', 'lee19_tfms', 'rgb_to_gray']

BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2  # torchvision's ColorJitter operations; hue is off in Lee19


def lee19_padding(size: int  # side of the square images
                  ) -> int:
    "Lee19's zero padding of the crop: 4 for sides up to 48 px (CIFAR), else 8."
    # CIFAR's images are 32 px, ImageNet's 84
    return 4 if size <= 48 else 8


def rgb_to_gray(x):  # float images (B, 3, H, W)
    "Luma (B, 1, H, W) of float images, with torchvision's weights."
    return (0.2989 * x[:, 0]).add_(x[:, 1], alpha=0.587).add_(x[:, 2], alpha=0.114).unsqueeze(1)


class BatchCropFlip(Transform):
    "Lee19's random crop and horizontal flip, drawn per image."
    # torchvision's RandomCrop(size, padding=pad) and RandomHorizontalFlip, done for the whole batch in one gather
    # before IntToFloatTensor (10): moving uint8 pixels is a quarter of the memory traffic of floats; training only
    order, split_idx = 5, 0

    def __init__(self,
                 pad: int = 4,         # zero padding of the crop, on each side
                 flip_p: float = 0.5): # probability of a horizontal flip
        super().__init__()
        self.pad, self.flip_p = pad, flip_p

    def draw(self,
             n: int,        # images in the batch
             device=None):  # where the draws are made (the batch's device)
        "Crop offsets (rows, columns in 0..2*pad) and flips for `n` images."
        top, left = torch.randint(0, 2 * self.pad + 1, (2, n), device=device)
        return top, left, torch.rand(n, device=device) < self.flip_p

    def apply(self,
              x,      # float or uint8 images (B, C, H, W)
              top,    # row offset of each crop, 0..2*pad
              left,   # column offset of each crop, 0..2*pad
              flip):  # which images to mirror, bool (B,)
        "Zero-pad `x`, crop at (`top`, `left`), mirror the images in `flip`."
        b, c, h, w = x.shape   # each crop is an HxW window of the padded image
        wp = w + 2 * self.pad
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        cols = torch.where(flip.view(b, 1, 1), cols.flip(-1), cols) + left.view(b, 1, 1)
        rows = top.view(b, 1, 1) + torch.arange(h, device=x.device).view(1, h, 1)
        idx = (rows * wp + cols).view(b, 1, h * w).expand(b, c, h * w)
        return F.pad(x, (self.pad,) * 4).view(b, c, -1).gather(2, idx).view(b, c, h, w)

    def encodes(self, x: TensorImage): return TensorImage(self.apply(x, *self.draw(len(x), x.device)))


class BatchColorJitter(Transform):
    "Lee19's colour jitter, drawn per image."
    # torchvision's ColorJitter(brightness, contrast, saturation) on a float batch in 0..1; the factors and the
    # order of the operations are drawn per image
    order, split_idx = 15, 0  # after IntToFloatTensor (10), before Normalize (99); training only

    def __init__(self, jitter: float = 0.4):  # factors are drawn uniformly from [1-jitter, 1+jitter]
        super().__init__()
        self.jitter = jitter

    def draw(self,
             n: int,        # images in the batch
             device=None):  # where the draws are made (the batch's device)
        "Per image, the three factors and their order, each (n, 3)."
        factors = torch.empty(n, 3, device=device).uniform_(1 - self.jitter, 1 + self.jitter)
        return factors, torch.rand(n, 3, device=device).argsort(dim=1)

    @staticmethod
    def apply(x,        # float images (B, 3, H, W) in 0..1, changed in place
              factors,  # brightness, contrast and saturation factors (B, 3)
              order):   # each image's order of the three operations (B, 3)
        "Jitter each image of `x` in place, in its own order of operations."
        for step in range(3):   # clamping to 0..1 after each step
            op = order[:, step].view(-1, 1, 1, 1)
            f = factors.gather(1, order[:, step:step + 1]).view(-1, 1, 1, 1)
            gray = rgb_to_gray(x)
            # the blend target: 0 for brightness, the mean grey for contrast, the grey image for saturation
            target = torch.addcmul(gray.mean(dim=(1, 2, 3), keepdim=True) * (op == CONTRAST), gray, (op == SATURATION).float())
            # torchvision's _blend, f * x + (1 - f) * target, in place: large fresh tensors cost more than the arithmetic
            x.mul_(f).add_(target.mul_(1 - f)).clamp_(0, 1)
        return x

    def encodes(self, x: TensorImage):
        # In place (the batch is IntToFloatTensor's fresh output), a few images at a time: on a CPU, temporaries of
        # a few MB are reused by the allocator, batch-sized ones come fresh from the OS every time (twice as slow).
        factors, order = self.draw(len(x), x.device)
        n = max(1, 2 ** 19 // (x.shape[-2] * x.shape[-1]))
        for chunk in zip(x.split(n), factors.split(n), order.split(n)): self.apply(*chunk)
        return x


class BatchResize(Transform):
    "Resize a float batch to `size` x `size` on its device."
    # in 0..1, one call per batch, as a model's pretrained input needs
    order = 11   # after IntToFloatTensor (10) and the crop at the stored size, so that the crop's padding scales with it

    def __init__(self,
                 size: int,                         # side of the square images the model takes
                 interpolation: str = 'bilinear'):  # 'bilinear', 'bicubic' or 'nearest', as timm's configs name them
        super().__init__()
        if interpolation not in ('bilinear', 'bicubic', 'nearest'):
            raise ValueError(f"interpolation must be bilinear, bicubic or nearest, got {interpolation!r}")
        self.size, self.interpolation = int(size), interpolation

    def encodes(self, x: TensorImage):
        if x.shape[-2:] == (self.size, self.size): return x
        smooth = self.interpolation != 'nearest'
        # antialiasing only matters when shrinking; bicubic overshoots 0..1, which the colour jitter expects
        y = F.interpolate(x.as_subclass(torch.Tensor), size=(self.size, self.size), mode=self.interpolation,
                          align_corners=False if smooth else None, antialias=smooth and x.shape[-1] > self.size)
        return TensorImage(y.clamp_(0, 1))


class NormalizeInPlace(Normalize):
    "fastai's `Normalize`, in place on the pipeline's fresh batch."
    # it spares two batch-sized tensors
    def encodes(self, x: TensorImage): return x.sub_(self.mean).div_(self.std)


def lee19_tfms(spec: InputSpec,        # the model's input: images loaded at `image_size`, resized to `size`, normalised
               augment: bool = True):  # add the training augmentation
    "A benchmark's batch transforms; augmentation in training only."
    # in order: crop and flip (padding by the loaded side), to float, resize, colour jitter, normalisation
    aug = [BatchCropFlip(pad=lee19_padding(spec.image_size)), BatchColorJitter()] if augment else []
    resize = [BatchResize(spec.size, spec.interpolation)] if spec.resized else []
    # colour jitter commutes with the flip, so flipping with the crop leaves Lee19's crop-jitter-flip result unchanged
    return sorted([IntToFloatTensor(), *aug, *resize, NormalizeInPlace.from_stats(spec.mean, spec.std, cuda=False)],
                  key=lambda t: t.order)
