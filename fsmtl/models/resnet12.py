"ResNet-12 of the few-shot papers (RFS, MetaOptNet), registered with timm as 'resnet12'."
import numbers
from typing import List, Optional, Tuple, Union

import torch
from timm.layers import DropBlock2d, create_classifier, get_device_dtype
from timm.layers.drop import drop_block_2d
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model, register_notrace_module
from timm.models._features import feature_take_indices   # what timm's own models import
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ['ResNet12', 'resnet12', 'dropblock_gamma_scale', 'MINI_IMAGENET_MEAN', 'MINI_IMAGENET_STD']

MINI_IMAGENET_MEAN = tuple(v / 255 for v in (120.39586422, 115.59361427, 104.54012653))
MINI_IMAGENET_STD = tuple(v / 255 for v in (70.68188272, 68.27635443, 72.54505529))


def dropblock_gamma_scale(height: int,  # of the feature map
                          width: int,   # of the feature map
                          block: int    # DropBlock's block size
                          ) -> float:   # the scale of timm's seed rate
    "The `gamma_scale` with which timm drops blocks as RFS does."
    # timm seeds blocks anywhere on the map, clipped at its edges, at RFS's rate, which counts only the seeds whose
    # whole block fits: on a 5x5 map with blocks of 5 it would drop ~76% of the activations instead of 10%.
    # Scaled, seeds times the pixels each covers is `drop_prob` of the map again. Loops, not sums of generators,
    # so that TorchScript compiles it.
    scale = 1.
    for size in [height, width]:
        k = min(block, size)
        covered = 0   # (seed, pixel) pairs along this axis
        for d in range(-(k // 2), k - k // 2): covered += size - abs(d)
        scale *= k * (size - k + 1) / covered
    return scale


def ramp_rate(rate: float,    # the final rate
              ramp: int,      # passes over which the rate grows from 0; 0 or less: no ramp
              count: Tensor   # passes so far
              ) -> float:     # the rate of the next pass
    "`rate` scaled by the share of the `ramp` that `count` passes have covered."
    if ramp <= 0: return rate
    return rate * min(1., float(count) / ramp)


class Dropout(nn.Dropout):
    "`nn.Dropout` that takes, and ignores, a `Stage`'s pass counter."
    def forward(self, x: Tensor, count: Optional[Tensor] = None) -> Tensor:  # feature map; passes so far (unused)
        "`x` with activations zeroed at rate `p` in training."
        return F.dropout(x, self.p, self.training, self.inplace)


@register_notrace_module   # a leaf for timm's FX tracing: its rate and block size are Python numbers of the input
class RampDropBlock(DropBlock2d):
    "timm's `DropBlock2d` per channel, its rate ramped over the model's passes."
    # its seed rate is scaled to the map (`dropblock_gamma_scale`)
    block_fixed: Optional[int]   # typed for TorchScript, which cannot infer it from a None

    def __init__(self,
                 drop_rate: float,                 # the rate at the end of the ramp
                 ramp: int,                        # training passes over which the rate grows from 0
                 stride: int,                      # of the map this drops on, relative to the image
                 block_size: Optional[int] = None):  # None: 5 for images of 64 px or more, else 2
        # blocks drawn for each channel apart, as RFS and MetaOptNet draw them (timm's default shares them)
        super().__init__(0., block_size or 5, couple_channels=False)
        self.drop_rate, self.ramp, self.stride, self.block_fixed = drop_rate, ramp, stride, block_size

    def forward(self,
                x: Tensor,                       # feature map (N, C, H, W)
                count: Optional[Tensor] = None):  # the model's training passes so far; None: the full rate
        "`x` with blocks dropped in training, at the ramp's rate after `count` passes."
        if not self.training: return x
        h, w = x.shape[-2], x.shape[-1]
        # the map is `stride` times smaller than the image, so `min(h, w) * stride >= 64` is RFS's image-size rule
        fixed = self.block_fixed   # a local, which TorchScript can narrow from Optional
        block = fixed if fixed is not None else (5 if min(h, w) >= 64 // self.stride else 2)
        rate = self.drop_rate if count is None else ramp_rate(self.drop_rate, self.ramp, count)
        # kept on the layer, as timm's `DropBlock2d` keeps them, to show what the last pass used
        self.drop_prob, self.block_size, self.gamma_scale = rate, block, dropblock_gamma_scale(h, w, block)
        if rate == 0.: return x
        return drop_block_2d(x, rate, block, self.gamma_scale, self.with_noise, self.inplace, self.couple_channels,
                             self.scale_by_keep)


@register_notrace_module   # a leaf for timm's FX tracing, so that tracing does not count a pass itself
class PassCounter(nn.Module):
    "Counts the model's training passes."
    # it passes the feature map through, so that hooks on every module (fastai's `summary`) see a map, not the 0-d counter
    _is_impure = True   # FX's dead-code elimination keeps impure calls

    def forward(self, x: Tensor, count: Tensor) -> Tensor:  # the feature map; the model's counter, changed in place
        "`x` unchanged; `count` one more after a training pass."
        if self.training: count.add_(1)
        return x


class Block(nn.Module):
    "Three 3x3 conv-BN-LeakyReLU with a 1x1 conv-BN shortcut, then a 2x2 max-pool."
    # the names are as in RFS and learn2learn
    def __init__(self, cin: int, cout: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False, **dd), nn.BatchNorm2d(cout, **dd)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False, **dd), nn.BatchNorm2d(cout, **dd)
        self.conv3, self.bn3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False, **dd), nn.BatchNorm2d(cout, **dd)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False, **dd), nn.BatchNorm2d(cout, **dd))
        self.relu, self.maxpool = nn.LeakyReLU(0.1), nn.MaxPool2d(2)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out)) + self.downsample(x)
        return self.maxpool(self.relu(out))


class Stage(nn.Sequential):
    "A `Block`, then its dropout or DropBlock, which is given the model's pass counter."
    def forward(self, x: Tensor, count: Optional[Tensor] = None) -> Tensor:  # images or map; passes so far
        "The stage's output map."
        return self[1](self[0](x), count)


class ResNet12(nn.Module):
    "ResNet-12: four residual stages, then global pooling."
    # dropout after the first two stages, DropBlock after the last two
    __jit_unused_properties__ = ['drop_prob']   # Python-side only, TorchScript need not compile it

    def __init__(self,
                 num_classes: int = 1000,            # classifier outputs; 0: `forward` gives the pooled features
                 in_chans: int = 3,                  # channels of the input images
                 channels=(64, 160, 320, 640),       # output channels of the four stages
                 drop_rate: float = 0.1,             # dropout of stages 1-2 and final DropBlock rate of stages 3-4
                 dropblock_size: int | None = None,  # DropBlock's block size; None: 5 for inputs of 64 px or more, else 2
                 dropblock_ramp: int = 40000,        # training passes over which DropBlock's rate grows from 0
                 global_pool: str = 'avg',           # timm's pooling type
                 device=None,                        # where to create the weights (timm's factory passes it)
                 dtype=None):                        # their dtype
        super().__init__()
        if len(channels) != 4 or not all(isinstance(c, numbers.Integral) and c > 0 for c in channels):
            raise ValueError(f"channels must give the widths of 4 stages, positive whole numbers, got {tuple(channels)}")
        dd = dict(device=device, dtype=dtype)
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.dropblock_size, self.dropblock_ramp, self.grad_checkpointing = dropblock_size, dropblock_ramp, False
        self.num_features = channels[-1]
        widths = (in_chans, *channels)
        for i in range(4):
            stride = 2 ** (i + 1)
            drop = Dropout(drop_rate) if i < 2 else RampDropBlock(drop_rate, dropblock_ramp, stride, dropblock_size)
            setattr(self, f'layer{i + 1}', Stage(Block(widths[i], widths[i + 1], **dd), drop))
        self.feature_info = [dict(num_chs=c, reduction=2 ** (i + 1), module=f'layer{i + 1}')
                             for i, c in enumerate(channels)]
        # saved with the weights, so that a resumed run carries on the ramp where it stopped
        self.register_buffer('num_batches_tracked', torch.tensor(0, dtype=torch.long, device=device))
        self.pass_counter = PassCounter()
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()   # twice as wide for 'catavgmax'
        for m in self.modules():
            if isinstance(m, nn.Conv2d): nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='leaky_relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def drop_prob(self) -> float:
        "DropBlock's rate for the next training pass."
        # 0 at first, rising linearly to `drop_rate` over `dropblock_ramp` passes
        return ramp_rate(self.drop_rate, self.dropblock_ramp, self.num_batches_tracked)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):  # timm's flag for stages (True) or blocks; one block per stage here
        "timm's groups: stage 1 as `stem`, 2 to 4, then the classifier."
        # the classifier, matched by neither, comes last
        # ResNet-12 has no stem: its first stage reads the images, as the stem of timm's ResNets does
        return dict(stem=r'^layer1\.', blocks=r'^layer(\d+)\.')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):  # recompute the blocks in the backward pass to save memory
        "Recompute each stage's `Block` in the backward pass."
        # the block only, not its dropout
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False):  # the name 'fc', not the module
        "The classifier head, or its name."
        # the head is `nn.Identity` when `num_classes` is 0
        return 'fc' if name_only else self.fc

    def reset_classifier(self,
                         num_classes: int,                # outputs of the new head; 0 for none
                         global_pool: str | None = None):  # timm's pooling name, '' none; None: the current one
        "A new head of `num_classes` outputs, the pooling kept unless given."
        self.num_classes = num_classes
        pool = self.global_pool.pool_type if global_pool is None else global_pool
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=pool,
                                                      **get_device_dtype(self))
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training), self.fc.train(self.training)   # new modules, in the model's mode

    @torch.jit.ignore
    def _stages(self, x: Tensor, last: int = 3) -> List[Tensor]:  # images; index of the last stage to run
        "The output maps of stages 0 to `last`, checkpointing each `Block` if asked."
        count, maps = self.num_batches_tracked, []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4)[:last + 1]:
            x = stage[1](checkpoint(stage[0], x) if self.grad_checkpointing else stage[0](x), count)
            maps.append(x)
        return maps

    def forward_features(self, x):  # images (N, C, H, W)
        "The feature map of the last stage, (N, 640, H/16, W/16)."
        if self.grad_checkpointing and not torch.jit.is_scripting(): x = self._stages(x)[-1]
        else:
            count = self.num_batches_tracked
            x = self.layer4(self.layer3(self.layer2(self.layer1(x, count), count), count), count)
        return self.pass_counter(x, self.num_batches_tracked)   # a training pass advances the DropBlock ramp

    def forward_intermediates(self,
                              x: Tensor,                                    # images (N, C, H, W)
                              indices: Optional[Union[int, List[int]]] = None,  # stages: None all, n the last n
                              norm: bool = False,                           # unused: ResNet-12 has no final norm
                              stop_early: bool = False,                     # run no stage past the last one returned
                              output_fmt: str = 'NCHW',                     # only NCHW
                              intermediates_only: bool = False              # return the stage maps only
                              ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:  # (last map, stage maps)
        "The maps of the stages in `indices`, with the final map."
        # (final map, stage maps), or the stage maps alone if `intermediates_only`
        if output_fmt != 'NCHW': raise ValueError(f"ResNet-12 gives NCHW maps only, not {output_fmt!r}")
        take, last = feature_take_indices(len(self.feature_info), indices)
        maps = self._stages(x, last if stop_early else 3)
        maps[-1] = self.pass_counter(maps[-1], self.num_batches_tracked)
        intermediates = [maps[i] for i in take]
        return intermediates if intermediates_only else (maps[-1], intermediates)

    def prune_intermediate_layers(self,
                                  indices: Union[int, List[int]] = 1,  # stages to keep, as in `forward_intermediates`
                                  prune_norm: bool = False,           # unused: ResNet-12 has no final norm
                                  prune_head: bool = True):           # remove the pooling and classifier too
        "Pass-throughs for the stages after the last of `indices`."
        take, last = feature_take_indices(len(self.feature_info), indices)
        for i in range(last + 1, 4):   # a pass-through that takes the counter like a stage
            setattr(self, f'layer{i + 1}', Stage(nn.Identity(), Dropout(0.)))
        if last < 3: self.num_features = self.feature_info[last]['num_chs']
        if prune_head or last < 3: self.reset_classifier(0, '')
        return take   # the kept indices

    def forward_head(self,
                     x,                         # the feature map of `forward_features`
                     pre_logits: bool = False):  # return the pooled features, not the classifier's outputs
        "The pooled features of the map `x`, or the classifier's outputs."
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x):  # images (N, C, H, W)
        "Class scores of the images `x`, or their pooled features when `num_classes` is 0."
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: ResNet12) -> dict:
    "A ResNet-12 state dict of fsmtl, RFS or learn2learn as `model`'s."
    # learn2learn's prefix and their class heads are dropped
    sd = {k.removeprefix('features.'): v for k, v in state_dict.items() if not k.startswith('classifier.')}
    sd.setdefault('num_batches_tracked', model.num_batches_tracked)
    # timm loads non-strictly whenever num_classes differs from the cfg's, so a wrong file would load in silence
    missing = [k for k in model.state_dict() if k not in sd and not k.startswith('fc.')]
    if missing: raise ValueError(f"not the weights of a ResNet-12: they lack {', '.join(missing[:5])}")
    return sd


default_cfgs = generate_default_cfgs({'resnet12': dict(
    url='', num_classes=1000, input_size=(3, 84, 84), pool_size=(5, 5), min_input_size=(3, 16, 16), crop_pct=1.,
    interpolation='bilinear', mean=MINI_IMAGENET_MEAN, std=MINI_IMAGENET_STD,
    first_conv=('layer1.0.conv1', 'layer1.0.downsample.0'), classifier='fc')})


@register_model
def resnet12(pretrained: bool = False,  # load the file given by `pretrained_cfg_overlay=dict(file=...)`
             **kwargs                 # passed to `ResNet12` (channels, drop_rate ...) and timm's `build_model_with_cfg`
             ) -> ResNet12:           # the backbone, with a classifier when `num_classes` > 0
    "ResNet-12 of widths 64-160-320-640 (MetaOptNet, RFS)."
    # no hub weights exist: pass a file by `pretrained_cfg_overlay`
    # `features_only` goes through `forward_intermediates`, which keeps the DropBlock ramp; 4 stages, no stem
    feature_cfg = dict(feature_cls='getter', out_indices=(0, 1, 2, 3), **kwargs.pop('feature_cfg', {}))
    return build_model_with_cfg(ResNet12, 'resnet12', pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=feature_cfg, **kwargs)
