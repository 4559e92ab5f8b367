"A pretrained backbone's own input, a splitter over timm's stages, frozen first epochs."
from __future__ import annotations
from fastai.callback.core import Callback
from fastai.learner import Recorder
from fasttransform import Pipeline
from torch import nn

from .data.core import InputSpec
from .data.transforms import lee19_tfms

__all__ = ['input_config', 'follow_input', 'mtl_splitter', 'FrozenEpochs']


def input_config(backbone: nn.Module,             # a timm model (pretrained or not)
                 image_size: int,                 # side the data's images are loaded at
                 size: int | None = None,         # the user's side of the input; None: the model's
                 mean=None,                       # the user's per-channel mean; None: the model's
                 std=None,                        # the user's per-channel std; None: the model's
                 interpolation: str | None = None  # the user's resize filter; None: the model's
                 ) -> InputSpec:
    "The input `backbone` was pretrained on, overridden by the user's."
    from timm.data import resolve_model_data_config
    cfg = resolve_model_data_config(backbone)
    given = dict(size=size, mean=mean, std=std, interpolation=interpolation)
    model = dict(size=int(cfg['input_size'][-1]), mean=tuple(cfg['mean']), std=tuple(cfg['std']),
                 interpolation=cfg.get('interpolation', 'bilinear'))
    out = {k: model[k] if v is None else v for k, v in given.items()}
    # timm also names 'bilinear'/'bicubic' filters that torch's batch resize lacks ('random', 'lanczos' ...)
    if out['interpolation'] not in ('bilinear', 'bicubic', 'nearest'): out['interpolation'] = 'bicubic'
    return InputSpec(image_size=image_size, **out)


def follow_input(dls,             # DataLoaders from `mtl_dls`
                 spec: InputSpec): # the input the model takes; its `image_size` is the one the images are loaded at
    "Serve `dls`'s batches as `spec`: resized per batch on the device, normalised by its statistics."
    dls.splits = dls.splits.with_input(spec)
    for dl in dls.loaders:
        dl.after_batch = Pipeline(lee19_tfms(spec, augment=True), split_idx=getattr(dl.dataset, 'split_idx', None))
    return dls


def _stage_params(backbone: nn.Module) -> list:
    "The backbone's parameters in timm's `group_matcher` stages, stem first."
    if not hasattr(backbone, 'group_matcher'): return [list(backbone.parameters())]   # all in one group
    from timm.models import group_parameters
    names = group_parameters(backbone, backbone.group_matcher(coarse=True))
    params = dict(backbone.named_parameters())
    return [[params[n] for n in group] for group in names.values() if group]


def mtl_splitter(model: nn.Module  # an `MTLModel`: a `backbone` and a `head`
                 ) -> list:        # lists of parameters, the head last
    "fastai's parameter groups: the backbone's stages, then the head."
    # timm's stages; one group for a backbone without a `group_matcher`
    return _stage_params(model.backbone) + [[model.head]]


class FrozenEpochs(Callback):
    "Train the head only for the first `epochs` epochs, then all."
    # as fastai's `freeze`, within one fit, so that a run resumes
    order = Recorder.order + 1

    def __init__(self, epochs: int = 1):  # epochs with the backbone frozen
        self.epochs, self.frozen = epochs, False

    # the optimiser's own freeze_to: `Learner.freeze` would also clear its state, which a resumed run must keep
    def before_epoch(self):
        if self.epoch < self.epochs and not self.frozen: self.learn.opt.freeze_to(-1); self.frozen = True
        elif self.epoch >= self.epochs and self.frozen: self.learn.opt.freeze_to(0); self.frozen = False

    def after_fit(self):
        if self.frozen: self.learn.opt.freeze_to(0); self.frozen = False
