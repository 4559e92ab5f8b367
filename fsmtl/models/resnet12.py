"ResNet-12 of the few-shot papers (RFS, MetaOptNet), with timm's DropBlock on a ramp; registered with timm as 'resnet12'."
from __future__ import annotations

import torch
from timm.layers import DropBlock2d, create_classifier, get_device_dtype
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ['ResNet12', 'resnet12', 'dropblock_gamma_scale', 'MINI_IMAGENET_MEAN', 'MINI_IMAGENET_STD']

MINI_IMAGENET_MEAN = tuple(v / 255 for v in (120.39586422, 115.59361427, 104.54012653))
MINI_IMAGENET_STD = tuple(v / 255 for v in (70.68188272, 68.27635443, 72.54505529))


def dropblock_gamma_scale(height: int,  # of the feature map
                          width: int,   # of the feature map
                          block: int):  # DropBlock's block size
    "The `gamma_scale` that makes timm's `DropBlock2d` drop about `drop_prob` of a map, as RFS's DropBlock does."
    # timm seeds blocks anywhere on the map, clipped at its edges, at RFS's rate, which counts only the seeds whose
    # whole block fits: on a 5x5 map with blocks of 5 it would drop ~76% of the activations instead of 10%.
    # Scaled, seeds times the pixels each covers is `drop_prob` of the map again.
    scale = 1.
    for size in (height, width):
        k = min(block, size)
        covered = sum(size - abs(d) for d in range(-(k // 2), k - k // 2))   # (seed, pixel) pairs along this axis
        scale *= k * (size - k + 1) / covered
    return scale


class Block(nn.Module):
    "Three 3x3 conv-BN-LeakyReLU with a 1x1 conv-BN shortcut, then a 2x2 max-pool; names as in RFS and learn2learn."
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.conv3, self.bn3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.relu, self.maxpool = nn.LeakyReLU(0.1), nn.MaxPool2d(2)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out)) + self.downsample(x)
        return self.maxpool(self.relu(out))


class ResNet12(nn.Module):
    "ResNet-12: four residual stages, dropout after the first two and DropBlock after the last two, then global pooling."
    def __init__(self,
                 num_classes: int = 1000,            # classifier outputs; 0: `forward` gives the pooled features
                 in_chans: int = 3,                  # channels of the input images
                 channels=(64, 160, 320, 640),       # output channels of the four stages
                 drop_rate: float = 0.1,             # dropout of stages 1-2 and final DropBlock rate of stages 3-4
                 dropblock_size: int | None = None,  # DropBlock's block size; None: 5 for inputs of 64 px or more, else 2
                 dropblock_ramp: int = 40000,        # training passes over which DropBlock's rate grows from 0
                 global_pool: str = 'avg'):          # timm's pooling type
        super().__init__()
        if len(channels) != 4: raise ValueError(f"channels must give the widths of 4 stages, got {tuple(channels)}")
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.dropblock_size, self.dropblock_ramp = dropblock_size, dropblock_ramp
        self.num_features = self.head_hidden_size = channels[-1]
        widths = (in_chans, *channels)
        for i in range(4):
            # blocks drawn for each channel apart, as RFS and MetaOptNet draw them (timm's default shares them)
            drop = nn.Dropout(drop_rate) if i < 2 else DropBlock2d(0., dropblock_size or 5, couple_channels=False)
            setattr(self, f'layer{i + 1}', nn.Sequential(Block(widths[i], widths[i + 1]), drop))
        # saved with the weights, so that a resumed run carries on the ramp where it stopped
        self.register_buffer('num_batches_tracked', torch.tensor(0, dtype=torch.long))
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        for m in self.modules():
            if isinstance(m, nn.Conv2d): nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='leaky_relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def drop_prob(self) -> float:
        "DropBlock's rate for the next training pass: 0 at first, rising linearly to `drop_rate` over `dropblock_ramp` passes."
        if self.dropblock_ramp <= 0: return self.drop_rate
        return self.drop_rate * min(1., self.num_batches_tracked.item() / self.dropblock_ramp)

    def _set_dropblocks(self, h: int, w: int):
        "Rate, block size and seed scale of the DropBlocks for an `h` x `w` input; stages 3 and 4 see it 8 and 16 times smaller."
        block, p = self.dropblock_size or (5 if min(h, w) >= 64 else 2), self.drop_prob
        for drop, stride in ((self.layer3[1], 8), (self.layer4[1], 16)):
            drop.drop_prob, drop.block_size = p, block
            drop.gamma_scale = dropblock_gamma_scale(max(1, h // stride), max(1, w // stride), block)

    def get_classifier(self) -> nn.Module:
        "The classifier head (`nn.Identity` when `num_classes` is 0)."
        return self.fc

    def reset_classifier(self,
                         num_classes: int,                # outputs of the new head; 0 for none
                         global_pool: str | None = None):  # timm's pooling name; None keeps the current one
        "A new head of `num_classes` outputs (0: none), keeping the pooling unless `global_pool` is given."
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, **get_device_dtype(self),
                                                      pool_type=global_pool or self.global_pool.pool_type)

    def forward_features(self, x):  # images (N, C, H, W)
        "The feature map of the last stage, (N, 640, H/16, W/16); a training pass also advances the DropBlock ramp."
        if self.training:
            self._set_dropblocks(*x.shape[-2:])
            self.num_batches_tracked.add_(1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self,
                     x,                         # the feature map of `forward_features`
                     pre_logits: bool = False):  # return the pooled features, not the classifier's outputs
        "The pooled features of the map `x`, or the classifier's outputs on them."
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x):  # images (N, C, H, W)
        "Class scores of the images `x`, or their pooled features when `num_classes` is 0."
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: ResNet12) -> dict:
    "A ResNet-12 state dict of fsmtl, RFS or learn2learn as `model`'s: learn2learn's prefix and their class heads dropped."
    sd = {k.removeprefix('features.'): v for k, v in state_dict.items() if not k.startswith('classifier.')}
    sd.setdefault('num_batches_tracked', model.num_batches_tracked)
    # timm loads non-strictly whenever num_classes differs from the cfg's, so a wrong file would load in silence
    missing = [k for k in model.state_dict() if k not in sd and not k.startswith('fc.')]
    if missing: raise ValueError(f"not the weights of a ResNet-12: they lack {', '.join(missing[:5])}")
    return sd


default_cfgs = generate_default_cfgs({'resnet12': dict(
    url='', num_classes=1000, input_size=(3, 84, 84), pool_size=(5, 5), crop_pct=1., interpolation='bilinear',
    mean=MINI_IMAGENET_MEAN, std=MINI_IMAGENET_STD, first_conv=('layer1.0.conv1', 'layer1.0.downsample.0'),
    classifier='fc')})


@register_model
def resnet12(pretrained: bool = False,  # load the file given by `pretrained_cfg_overlay=dict(file=...)`
             **kwargs                 # passed to `ResNet12` (channels, drop_rate ...) and timm's `build_model_with_cfg`
             ) -> ResNet12:           # the backbone, with a classifier when `num_classes` > 0
    "ResNet-12 of widths 64-160-320-640 (MetaOptNet, RFS); no hub weights exist, pass a file by `pretrained_cfg_overlay`."
    return build_model_with_cfg(ResNet12, 'resnet12', pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)
