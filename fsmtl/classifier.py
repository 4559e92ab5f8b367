"`FewShotClassifier`: new classes told apart by a backbone's features and a probe."
from __future__ import annotations
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from fastai.vision.core import TensorImage
from torch import nn

from .adapt import finetune_copy
from .checkpoint import backbone_from_checkpoint, read_checkpoint, save_atomic
from .data.core import InputSpec
from .data.images import decode_image, rgb
from .data.transforms import BatchResize
from .features import extract_features, feature_model, model_device
from .probe import get_probe

__all__ = ['FewShotClassifier', 'image_batch', 'CHECKPOINT_KEYS']

CHECKPOINT_KEYS = ('arch', 'arch_kwargs', 'backbone', 'size', 'mean', 'std')   # what `from_checkpoint` needs


def _items(images) -> list:
    "`images` as a list of single images."
    # a (N, 3, H, W) tensor or (N, H, W, 3) uint8 array is split; one path or PIL image is wrapped
    if isinstance(images, (str, Path, Image.Image)): return [images]
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim != 4:
        raise ValueError(f"an array of shape {tuple(images.shape)} is not a batch: pass a (N, 3, H, W) tensor, "
                         "a (N, H, W, 3) uint8 array, or a list of images")
    return list(images)


def _image(im, size: int) -> torch.Tensor:
    "One image as float (3, size, size) in 0..1."
    # from a path, a PIL image, a uint8 HxWx3 array, or a 3xHxW tensor (uint8 in 0..255, float in 0..1)
    if isinstance(im, torch.Tensor):
        im = im.detach().cpu()
        if im.dim() != 3 or im.shape[0] not in (1, 3):
            raise ValueError(f"image tensors must be (3, H, W), got {tuple(im.shape)}")
        if im.dtype == torch.uint8: im = im.expand(3, -1, -1).permute(1, 2, 0).numpy()   # resized as the arrays are
        else:
            im = im.float().expand(3, -1, -1)
            if im.shape[1:] == (size, size): return im
            # channel by channel as 32-bit float images, so that PIL's bilinear resize keeps the precision
            return torch.from_numpy(np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.BILINEAR))
                                              for c in np.ascontiguousarray(im.numpy())]))
    if isinstance(im, np.ndarray):
        if im.dtype != np.uint8: raise ValueError(f"image arrays must be uint8 (H, W, 3), got {im.dtype}: pass float "
                                                  "images as (3, H, W) tensors in 0..1")
        im = Image.fromarray(im[..., 0] if im.ndim == 3 and im.shape[-1] == 1 else im)
    if isinstance(im, Image.Image):
        im = rgb(im)
        if im.size != (size, size): im = im.resize((size, size), Image.BILINEAR)
        im = np.asarray(im)
    elif isinstance(im, (str, Path, bytes)): im = decode_image(im, size)
    else: raise TypeError(f"cannot read an image from {type(im).__name__}: pass file paths, PIL images, arrays or tensors")
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255


def image_batch(images,         # file paths, PIL images, uint8 (H, W, 3) arrays, (3, H, W) tensors, or a (N, 3, H, W) tensor
                spec: InputSpec  # the input the backbone takes
                ) -> torch.Tensor:  # normalised float (N, 3, size, size), on the CPU
    "`images` served as `spec`, as training served its batches."
    # RGB, resized to `image_size` by PIL's bilinear filter, as benchmarks load them; then, as training batches are,
    # to `size` by `BatchResize`; then (x/255 - mean) / std
    items, loaded = _items(images), spec.image_size
    x = torch.stack([_image(im, loaded) for im in items]) if items else torch.zeros(0, 3, loaded, loaded)
    if spec.resized: x = BatchResize(spec.size, spec.interpolation)(TensorImage(x)).as_subclass(torch.Tensor)
    return (x - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]


class FewShotClassifier:
    "Classifies new classes from a few examples of each."
    # a probe on a backbone's L2-normalised features
    def __init__(self,
                 backbone: nn.Module,      # the trained backbone (a model with a `backbone` gives that)
                 size: int,                # side of the square images the backbone was trained on
                 mean,                     # per-channel mean of images in 0..1, as in training
                 std,                      # per-channel std of images in 0..1, as in training
                 probe='logistic',         # 'logistic', 'sklearn' or 'proto' (see `get_probe`), or a probe
                 C: float = 3.,            # inverse regularisation strength of the logistic probes
                 arch: str | None = None,  # timm name of the backbone's architecture, for `save`; None: found on the backbone
                 arch_kwargs: dict | None = None,  # keyword arguments of `timm.create_model` that rebuild the backbone
                 chunk: int = 256,         # images read and passed forward at once
                 finetune_steps: int = 0,  # fine-tune a copy of the backbone on the support images first (P>M>F)
                 finetune_lr: float = 1e-3,  # the learning rate of that fine-tuning
                 image_size: int | None = None,  # side images were loaded at in training, before resizing; None: `size`
                 interpolation: str = 'bilinear'):  # the filter of that resize to `size`
        self.backbone, self.chunk = feature_model(backbone), chunk
        self.input = InputSpec(size, mean, std, image_size, interpolation)
        self.finetune_steps, self.finetune_lr, self.finetuned = int(finetune_steps), float(finetune_lr), None
        self.probe, self.C, self.arch, self.arch_kwargs = probe, float(C), arch, arch_kwargs
        get_probe(probe, C)   # an unknown probe name fails here rather than in `fit`

    def __repr__(self):
        "The backbone's class, image size, probe and classes."
        fitted = f"{len(self.classes)} classes" if hasattr(self, 'classes') else 'not fitted'
        return f"FewShotClassifier({type(self.backbone).__name__}, {self.input.size}px, {self.probe} probe, {fitted})"

    @classmethod
    def from_learner(cls,
                     learn,              # a trained `mtl_learner`
                     probe='logistic',   # 'logistic', 'sklearn' or 'proto', or a probe
                     **kw):              # more arguments of `FewShotClassifier` (C, chunk ...)
        "An unfitted classifier on `learn`'s backbone and input."
        # the benchmark's image size and normalisation
        return cls.from_input(feature_model(learn.model), learn.dls.splits.input, probe, **kw)

    @classmethod
    def from_input(cls,
                   backbone: nn.Module,  # the trained backbone
                   spec: InputSpec,      # the input it was trained on
                   probe='logistic',     # 'logistic', 'sklearn' or 'proto', or a probe
                   **kw):                # more arguments of `FewShotClassifier` (C, chunk ...)
        "An unfitted classifier on `backbone`, serving images as `spec`."
        return cls(backbone, spec.size, spec.mean, spec.std, probe, image_size=spec.image_size,
                   interpolation=spec.interpolation, **kw)

    def features(self, images  # file paths, PIL images, arrays or tensors
                 ) -> torch.Tensor:
        "L2-normalised features (N, D) of `images`."
        # on the backbone's device; `chunk` images are read at a time
        items, device = _items(images), model_device(self.backbone)
        if not items: raise ValueError("no images given")
        # after a fit with `finetune_steps`, the fine-tuned copy; the stored backbone is never changed
        model = self.backbone if self.finetuned is None else self.finetuned
        return torch.cat([extract_features(model, image_batch(items[i:i + self.chunk], self.input).to(device),
                                           self.chunk)
                          for i in range(0, len(items), self.chunk)])

    def fit(self,
            support,  # a few images of each class: file paths, PIL images, arrays or tensors
            labels):  # the class of each, any hashable values
        "Fit the probe on the `support` images and their `labels`."
        items = _items(support)
        labels = labels.tolist() if isinstance(labels, (torch.Tensor, np.ndarray)) else list(labels)
        if not items: raise ValueError("no support images: give a few labelled images of each class, two classes at least")
        if len(items) != len(labels):
            raise ValueError(f"{len(items)} support images but {len(labels)} labels: give one label per image")
        classes = list(dict.fromkeys(labels))   # in the order of first appearance
        # Python takes True for 1 and False for 0: as dict keys they would merge two classes
        merged = [f"{l!r} and {c!r}" for l in labels for c in classes if l == c and isinstance(l, bool) != isinstance(c, bool)]
        if merged:
            raise ValueError(f"labels {merged[0]} are one value in Python, so their images would be one class: give labels "
                             "of one type (all strings, or all numbers)")
        if len(classes) < 2:
            raise ValueError(f"all support images are of one class ({classes[0]!r}): give images of two classes at least")
        index = {c: i for i, c in enumerate(classes)}
        y = torch.tensor([index[l] for l in labels])
        self.finetuned = None
        if self.finetune_steps:
            x = image_batch(items, self.input).to(model_device(self.backbone))
            self.finetuned = finetune_copy(self.backbone, x, y, self.input.mean, self.input.std, self.finetune_steps, self.finetune_lr)
        return self._fit(self.features(items), y, classes)

    def _fit(self, feats, y, classes):
        "Keep the support features, their labels and the probe fitted on them."
        # `y`: indices into `classes`
        self.support, self.support_labels, self.classes = feats, y.to(feats.device), classes
        self.probe_ = get_probe(self.probe, self.C).fit(self.support, self.support_labels)
        return self

    def predict_proba(self, images  # file paths, PIL images, arrays or tensors
                      ) -> np.ndarray:
        "Probabilities (N, n_classes) of `images`' classes."
        # the columns in the order of `classes`
        if not hasattr(self, 'probe_'): raise RuntimeError("the classifier is not fitted: call fit(support, labels) first")
        return self.probe_.predict_proba(self.features(images).to(self.support.device)).cpu().numpy()

    def predict(self, images):  # file paths, PIL images, arrays or tensors
        "The predicted label of each of `images`, and its probability."
        # the labels as a list, the probabilities as a numpy array
        p = self.predict_proba(images)
        best = p.argmax(1)
        return [self.classes[i] for i in best], p[np.arange(len(p)), best]

    def _arch(self):
        "timm's name and keyword arguments of the backbone."
        # as given to the constructor, else as found on the backbone
        known = getattr(self.backbone, 'fsmtl_arch', None)
        if self.arch is not None: arch, kwargs = self.arch, {}
        elif known: arch, kwargs = known['arch'], known.get('kwargs') or {}
        else: arch, kwargs = (getattr(self.backbone, 'pretrained_cfg', None) or {}).get('architecture'), {}
        if arch is None:
            raise ValueError(f"the architecture of the {type(self.backbone).__name__} backbone is unknown, so it could not be "
                             "rebuilt from the file: pass arch='<timm model name>' (and arch_kwargs=) to FewShotClassifier")
        return arch, dict(self.arch_kwargs if self.arch_kwargs is not None else kwargs)

    def save(self, path):  # the file to write
        "Save to `path`, through a temporary file, what `load` needs."
        arch, kwargs = self._arch()
        if not isinstance(self.probe, str): raise ValueError("save needs the probe by name ('logistic', 'sklearn' or 'proto')")
        fitted = hasattr(self, 'probe_')
        state = dict(arch=arch, arch_kwargs=kwargs, **self.input.state(), probe=self.probe, C=self.C,
                     # a fine-tuned copy is what the stored support features and later predictions come from
                     backbone={k: v.detach().cpu() for k, v in (self.backbone if self.finetuned is None else self.finetuned).state_dict().items()},
                     # label values other than str or int are stored as str
                     classes=[c if isinstance(c, (str, int)) else str(c) for c in getattr(self, 'classes', [])],
                     support=self.support.cpu() if fitted else torch.zeros(0),
                     support_labels=self.support_labels.cpu() if fitted else torch.zeros(0, dtype=torch.long))
        return save_atomic(state, path)

    @staticmethod
    def _read(path) -> dict:
        "The checkpoint at `path` (a file or a run's best.pth), with `CHECKPOINT_KEYS`."
        state = read_checkpoint(path, prefer='best')
        missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
        if missing: raise ValueError(f"{path} lacks {', '.join(missing)}: a checkpoint needs {', '.join(CHECKPOINT_KEYS)}, "
                                     "as FewShotClassifier.save writes")
        return state

    @classmethod
    def from_checkpoint(cls,
                        path,              # best.pth or last.pth of a run, or a run folder
                        probe='logistic',  # 'logistic', 'sklearn' or 'proto', or a probe
                        device=None,       # where the backbone runs; None: the CPU
                        **kw):             # more arguments of `FewShotClassifier` (C, chunk ...)
        "An unfitted classifier on the backbone saved at `path`."
        # the backbone is rebuilt with timm
        return cls._build(cls._read(path), path, probe, device, **kw)

    @classmethod
    def _build(cls, st, path, probe, device, **kw):
        "An unfitted classifier from checkpoint `st`: the backbone rebuilt with its weights."
        return cls.from_input(backbone_from_checkpoint(st, path).eval().to(device or 'cpu'), InputSpec.from_state(st), probe,
                              arch=st['arch'], arch_kwargs=st['arch_kwargs'], **kw)

    @classmethod
    def load(cls,
             path,          # a file written by `save`
             device=None):  # where the backbone runs; None: the CPU
        "The classifier saved at `path`, its probe refitted."
        st = cls._read(path)
        clf = cls._build(st, path, st.get('probe', 'logistic'), device, C=st.get('C', 3.))
        if st.get('classes'):   # refitted on the stored support features, it predicts as before
            clf._fit(st['support'].to(model_device(clf.backbone)), st['support_labels'], list(st['classes']))
        return clf
