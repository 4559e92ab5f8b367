"Backbone features for the probes: in eval mode, in chunks, L2-normalised."
from __future__ import annotations
import math

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import unwrap

__all__ = ['feature_model', 'model_device', 'pooled_features', 'extract_features']


def feature_model(model: nn.Module  # a backbone, or a model with a `backbone`
                  ) -> nn.Module:
    "The part of `model` that maps images to features."
    model = unwrap(model)   # from data parallelism
    return getattr(model, 'backbone', model)   # its `backbone`, else itself


def model_device(model: nn.Module  # any module
                 ) -> torch.device:
    "The device of `model`'s first parameter; the CPU if it has none."
    return next(model.parameters(), torch.empty(0)).device


def pooled_features(m: nn.Module,      # a backbone: a timm model, with or without its classifier, or any module
                    x: torch.Tensor):  # normalised images (N, C, H, W)
    "The features of `x` before any classifier, in `m`'s mode and with autograd."
    # a timm model that still has its classifier gives its pooled features through forward_head(pre_logits=True)
    if getattr(m, 'num_classes', 0) and hasattr(m, 'forward_head'):
        return m.forward_head(m.forward_features(x), pre_logits=True)
    return m(x)


def extract_features(model: nn.Module,         # a backbone, or a model with a `backbone`
                     x: torch.Tensor,          # normalised images (N, C, H, W)
                     chunk: int = 256,         # images per forward pass at most: bounds the activations held at once
                     normalize: bool = True):  # L2-normalise each feature vector, as the probes expect
    "Features (N, D) of `x` in eval mode, without autograd."
    # `chunk` images at a time; the model's mode is restored after
    m = feature_model(model)
    training = m.training
    m.eval()
    try:
        with torch.no_grad():
            # equal passes of at most `chunk` images: 275 images go as 138 + 137, not 256 + 19
            parts = x.as_subclass(torch.Tensor).tensor_split(max(1, math.ceil(len(x) / chunk)))
            out = torch.cat([pooled_features(m, c).flatten(1).float() for c in parts])
    finally:
        m.train(training)
    return F.normalize(out, dim=-1) if normalize else out
