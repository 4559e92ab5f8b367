"`create_backbone`: any timm architecture by name, without its classifier."
from __future__ import annotations
import difflib
from pathlib import Path

import timm
from torch import nn

from ..files import read_torch_file
from .resnet12 import ResNet12  # noqa: F401 (importing it registers 'resnet12' with timm)

__all__ = ['create_backbone', 'check_arch']


def check_arch(arch: str):  # timm name of an architecture, optionally with a weights tag ('resnet18.a1_in1k')
    "Raise a `ValueError` naming close matches if timm knows no `arch`."
    # 'hf-hub:' and 'local-dir:' names are resolved by timm itself
    if ':' in arch or timm.is_model(arch): return
    close = difflib.get_close_matches(arch, timm.list_models(), n=8)
    hint = f"close matches: {', '.join(close)}" if close else "no close match"
    raise ValueError(f"Unknown architecture {arch!r} ({hint}); timm.list_models('*pattern*') lists all the names, "
                     "e.g. timm.list_models('*resnet*')")


def _weights_file(path) -> Path:
    "`path`, checked to be a weights file: a state dict, not an fsmtl checkpoint."
    path = Path(path).expanduser()
    if not path.is_file(): raise FileNotFoundError(f"No weights file {path}: pretrained= takes a .pth, .pt, .bin or "
                                                   ".safetensors file, or True for timm's weights from the hub")
    if path.suffix == '.safetensors': return path   # read by safetensors, which checks it itself
    fix = "pretrained= (--pretrained) takes a weights file: a state dict saved by torch.save, or .safetensors"
    st = read_torch_file(path, "weights file", fix)
    if isinstance(st, dict) and {'arch', 'backbone'} <= set(st):
        raise ValueError(f"{path} is an fsmtl checkpoint, not a weights file: test it with fsmtl test --load_path {path}, "
                         "or start training from its weights with --load_path (load_path=) instead of --pretrained")
    return path


def create_backbone(arch: str = 'resnet12',               # timm name of the architecture: 'resnet12', 'resnet18'...
                    pretrained: bool | str | Path = False,  # True: timm's weights from the hub; a path: a local weights file
                    **kwargs                                # passed to `timm.create_model`, and kept to rebuild the backbone
                    ) -> tuple[nn.Module, int]:             # the backbone and its number of features
    "A timm backbone without classifier, and its feature count."
    check_arch(arch)
    local = isinstance(pretrained, (str, Path))
    overlay = dict(pretrained_cfg_overlay=dict(file=str(_weights_file(pretrained)))) if local else {}
    try: model = timm.create_model(arch, pretrained=bool(pretrained), num_classes=0, **overlay, **kwargs)
    except TypeError as e:   # a keyword argument the architecture does not take, or a value of the wrong type
        raise ValueError(f"{arch} cannot be built with the keyword arguments {kwargs} (model_kwargs, arch_kwargs): {e}") from e
    except Exception as e:
        if pretrained is not True: raise
        raise RuntimeError(f"The pretrained weights of {arch} could not be fetched ({type(e).__name__}: {e}). Download "
                           f"them where there is a network and pass the file: create_backbone({arch!r}, "
                           "pretrained='/path/to/weights.pth'), or --pretrained /path/to/weights.pth to the fsmtl "
                           "command") from e
    # what `FewShotClassifier` needs to rebuild the backbone from a saved file
    model.fsmtl_arch = {'arch': arch, 'kwargs': dict(kwargs)}
    return model, model.num_features
