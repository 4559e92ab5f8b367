"Backbones: ResNet-12 in timm, and `create_backbone` for any timm architecture."
from .resnet12 import ResNet12, resnet12, dropblock_gamma_scale, MINI_IMAGENET_MEAN, MINI_IMAGENET_STD
from .backbone import create_backbone, check_arch

__all__ = ['ResNet12', 'resnet12', 'dropblock_gamma_scale', 'MINI_IMAGENET_MEAN', 'MINI_IMAGENET_STD',
           'create_backbone', 'check_arch']
