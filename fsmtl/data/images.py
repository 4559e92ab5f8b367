"Image files of a folder, each once, and a check that each one decodes."
from __future__ import annotations
import io
import os
from pathlib import Path

import numpy as np
from fastai.data.transforms import get_files, image_extensions
from fastcore.parallel import parallel
from PIL import Image

__all__ = ['rgb', 'decode_image', 'image_files', 'class_dirs', 'class_images', 'unreadable_images', 'check_images']


def rgb(im  # a PIL image of any mode
        ) -> Image.Image:
    "`im` as an 8-bit RGB image; 16-bit grey keeps its shades."
    # PIL clips 16-bit grey (mode I;16) to 255, a white image; 16 bits go to 8 as PIL reduces 16-bit RGB and as
    # torchvision's `to_dtype(scale=True)` does: the high byte
    if im.mode.startswith('I;16'):
        return Image.fromarray((np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)).convert('RGB')
    if im.mode in ('I', 'F'):
        raise ValueError(f"a 32-bit {'float' if im.mode == 'F' else 'integer'} image (PIL mode {im.mode}) has no one way to "
                         "8 bits: save it with 8 or 16 bits a channel")
    return im.convert('RGB')


def decode_image(item,              # PNG or JPEG bytes (or a uint8 array of them), a path, or a PIL image
                 size: int | None):  # side of the square image returned; None keeps the image's own size
    "One image as uint8 HxWx3 RGB, resized to `size` if given."
    try:
        im = item if isinstance(item, Image.Image) else \
            Image.open(io.BytesIO(item) if isinstance(item, (bytes, np.ndarray)) else item)
        im = rgb(im)
    except Exception as e:
        raise ValueError(f"Cannot read image {item if isinstance(item, (str, Path)) else '(encoded bytes)'}: {e}") from e
    if size is not None and im.size != (size, size): im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im)


def _identity(path):
    "What makes two paths the same file; a dangling link is only itself."
    # a link and its target, or two hard links, share the device and the inode
    try: st = os.stat(path)
    except OSError: return path
    return st.st_dev, st.st_ino


def class_dirs(path  # a folder
               ) -> list:
    "The folders in `path`, sorted, hidden ones left out: the class folders of a folder benchmark."
    return sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith('.'))


def image_files(
    folder,        # a folder of images
    recurse=True,  # also the images in its sub-folders
) -> list:
    "Image files under `folder`, sorted, each once."
    # hidden files are skipped, links to folders not followed
    # fastai's `get_image_files` walks links to folders, so a link to a parent folder is walked round ~40 times
    files = sorted(get_files(folder, extensions=image_extensions, recurse=recurse, followlinks=False))
    once = {}
    for f in sorted(files, key=os.path.islink): once.setdefault(_identity(f), f)   # of a file and its links, the file
    return sorted(once.values())


def _shared(files):
    "Pairs of paths in different classes of `files` that are one file."
    # `files`: per class, its paths; a pair is a link and its target
    owner, pairs = {}, []
    for c, class_files in enumerate(files):
        for f in class_files:
            other = owner.setdefault(_identity(f), (c, f))
            if other[0] != c: pairs.append(f"{other[1]} and {f}")
    return pairs


def class_images(
    dirs,  # class folders
) -> list:
    "The `image_files` of each class folder in `dirs`."
    # refuses empty classes and images in two classes
    files = [image_files(d) for d in dirs]
    if empty := [str(d) for d, f in zip(dirs, files) if not f]:
        raise ValueError(f"These class folders hold no images (judged by file extension; links to folders are not "
                         f"followed): {', '.join(empty)}")
    if shared := _shared(files):
        raise ValueError(f"{len(shared)} image(s) are in two classes at once, through links; an image belongs to one "
                         "class: remove one path of each pair:\n  " + '\n  '.join(shared[:20]))
    return files


def _decode_error(path, size):
    "Why `path` does not decode as training decodes it; None if it does."
    try:
        with Image.open(path) as im:
            # a JPEG is decoded at the smallest scale that still covers `size`: every byte is still read, less is computed
            if size: im.draft('RGB', (size, size))
            rgb(im)
    except Exception as e: return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return None


def unreadable_images(
    files,        # image file paths
    size=None,    # side the images will be resized to; lets a JPEG be decoded at a smaller scale
    n_workers=4,  # threads that decode at once (PIL releases the GIL while decoding)
) -> list:
    "(path, reason) of each of `files` that fails a full decode."
    # every byte is read, not just the header
    files = list(files)
    errors = parallel(_decode_error, files, size=size, n_workers=min(n_workers, len(files)), threadpool=True, progress=False)
    return [(f, e) for f, e in zip(files, errors) if e is not None]


def check_images(
    files,      # image file paths
    size=None,  # side the images will be resized to
):
    "Decode all of `files`; a `ValueError` names each bad one and why."
    bad = [f"{f} ({why})" for f, why in unreadable_images(files, size)]
    if not bad: return
    more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ''
    raise ValueError(f"{len(bad)} image(s) cannot be read; remove or replace them:\n  " + '\n  '.join(bad[:20]) + more)
