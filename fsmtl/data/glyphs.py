"The embedded benchmark: letters drawn in matplotlib's fonts and distorted as scans of letters vary, split by script."
from __future__ import annotations
import json, unicodedata
from functools import partial
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.ft2font import FT2Font, LoadFlags
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import distance_transform_edt

from ..files import write_atomic
from ..progress import with_bar
from .core import SPLITS, FewShotSplits, Split

__all__ = ['glyphs', 'SMALL_IMAGES']

# 2: hundreds of images a class, distorted in batches (slant, wobble, stroke width, blur, tones, noise)
VERSION = 2
SMALL_IMAGES = 20   # images a class of the small setting ('glyphs-small'): tests, and the regime before version 2
# Whole scripts per split, as Omniglot splits by alphabet: test letters come from scripts never seen in training.
SCRIPTS = {'train': ('LATIN', 'GREEK', 'CYRILLIC'), 'val': ('ARMENIAN', 'LAO'), 'test': ('GEORGIAN',)}
MIN_FONTS = 8
REF_FONT = 'DejaVuSans.ttf'  # the font with the most letters: look-alikes are compared in one design
SAME_SHAPE = 0.02            # two letters are one when less than this share of either's ink lies off the other's strokes


def _fonts():
    "Font file name -> FT2Font for matplotlib's TTF fonts."
    d = Path(matplotlib.get_data_path())/'fonts'/'ttf'
    # LastResort draws the same placeholder box for every code point of a block: not a design of any letter.
    return {p.name: FT2Font(str(p)) for p in sorted(d.glob('*.ttf')) if not p.name.startswith('LastResort')}


def _draw(font, ch, px, angle=0.):
    "Grey ink of `ch` at `px` pixels per em, rotated by `angle` degrees; None if blank."
    font.set_size(px, 72)
    font.set_text(ch, angle, flags=LoadFlags.NO_HINTING)
    font.draw_glyphs_to_bitmap()
    im = font.get_image()
    rows, cols = np.flatnonzero(im.any(1)), np.flatnonzero(im.any(0))  # cropped to the ink; 0 is the background
    return im[rows[0]:rows[-1]+1, cols[0]:cols[-1]+1] if len(rows) else None


def _has(name, font, ch):
    "Whether `font` draws a glyph of `ch` itself."
    idx = font.get_char_index(ord(ch))
    # The Computer Modern (BaKoMa) fonts map code points to TeX-encoding slots: cmex10 has delimiters at 'A'..'z',
    # cmsy10 symbols at 'a'..'z', cmr10 'Γ' at '¡'. Their glyph names are the letters, so trust only those.
    if name.startswith('cm') and font.get_glyph_name(idx) != ch: return False
    return idx != 0 and _draw(font, ch, 32) is not None


def _script(ch):
    "The script of `ch` in `SCRIPTS`, from the first words of its Unicode name, or None."
    name = unicodedata.name(ch, '')
    return next((s for ss in SCRIPTS.values() for s in ss if name.startswith(s + ' ')), None)


def _candidate(ch):
    "Whether `ch` is a letter of a chosen script and no variant of another."
    # variants: accented, stroked or compatibility forms.
    # NFKD also catches ligatures, super/subscripts and math letters; ' WITH ' catches strokes, hooks and bars.
    return (unicodedata.category(ch) in ('Lu', 'Ll', 'Lo') and _script(ch) is not None
            and unicodedata.normalize('NFKD', ch) == ch and ' WITH ' not in unicodedata.name(ch))


def _shape(font, ch):
    "Ink mask of `ch` centred in a 32 pixel square: its shape alone."
    # size and place are taken out, as `_distort` puts them in
    ink = _draw(font, ch, 64)
    h, w = ink.shape
    sq = np.zeros((max(h, w),)*2, np.uint8)
    sq[(len(sq)-h)//2:][:h, (len(sq)-w)//2:][:, :w] = ink
    return np.asarray(Image.fromarray(sq).resize((32, 32), Image.BOX)) > 127


def _letters(fonts):
    "Letters to draw, train scripts first, each with the fonts that have it."
    # look-alikes of earlier letters are left out
    order = [s for ss in SCRIPTS.values() for s in ss]
    cands = sorted({chr(c) for f in fonts.values() for c in f.get_charmap() if _candidate(chr(c))},
                   key=lambda ch: (order.index(_script(ch)), ch))
    kept, inks, fars = {}, np.zeros((0, 32, 32), bool), np.zeros((0, 32, 32), bool)
    for ch in cands:
        names = [n for n, f in fonts.items() if _has(n, f, ch)]
        if len(names) < MIN_FONTS or REF_FONT not in names: continue
        ink = _shape(fonts[REF_FONT], ch)
        far = distance_transform_edt(~ink) > 2  # off the strokes, beyond what font and alignment differences move them
        off = np.maximum((fars & ink).sum((1, 2))/ink.sum(), (inks & far).sum((1, 2))/inks.sum((1, 2)))
        # Greedy, in split order, so that a homoglyph (A/Α/А, o/O) of a training letter never reaches val or test.
        if (off < SAME_SHAPE).any(): continue
        kept[ch] = names
        inks, fars = np.concatenate([inks, ink[None]]), np.concatenate([fars, far[None]])
    return kept


def _master(ink, side):
    "`ink` scaled to fill 3/4 of a `side` square, centred: a letter's design before distortion, ink 0..1."
    h, w = ink.shape
    scale = 0.75*side/max(h, w)
    w, h = max(1, round(w*scale)), max(1, round(h*scale))
    out = np.zeros((side, side), np.float32)
    out[(side-h)//2:][:h, (side-w)//2:][:, :w] = np.asarray(Image.fromarray(ink).resize((w, h), Image.LANCZOS))/255
    return out


def _uniform(gen, n, lo, hi): return lo + (hi - lo)*torch.rand(n, generator=gen)


def _gauss(x, sigma, k):
    "`x` (B, 1, H, W) blurred by a Gaussian of width `sigma` pixels (a float, or one per image (B,)), `k` taps a side."
    r = torch.arange(k) - k//2
    sigma = torch.as_tensor(sigma, dtype=torch.float32).clamp(min=1e-3).reshape(-1, 1)
    g = torch.exp(-r**2/(2*sigma**2))
    b, _, h, w = x.shape
    # each image a channel of its own: torch's depthwise convolution is many times faster on the CPU than a batch of one channel
    g = (g/g.sum(1, keepdim=True)).expand(b, k)[:, None, None]   # (B, 1, 1, k)
    x = F.conv2d(x.view(1, b, h, w), g, padding=(0, k//2), groups=b)   # along rows, then columns
    return F.conv2d(x, g.transpose(2, 3), padding=(k//2, 0), groups=b).view(b, 1, h, w)


def _distort(masters, gen, size):
    "Images (B, `size`, `size`) uint8, dark on light, of `masters` (B, 1, 2*`size`, 2*`size`), each randomly distorted."
    # as scans of letters vary: slant, rotation, size, aspect and place; a wobble of the strokes; stroke width; blur,
    # ink and paper tones and sensor noise. Drawn at twice the size, then averaged down.
    b, u = len(masters), partial(_uniform, gen, len(masters))
    rot, slant, scale, aspect = u(-0.2, 0.2), u(-0.35, 0.35), u(0.75, 1.1), u(0.8, 1.2)
    cos, sin = rot.cos(), rot.sin()
    # output = R @ slant @ diag(scale*aspect, scale) @ input + shift; grid_sample wants input in terms of output
    fwd = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1) @ \
          torch.stack([torch.stack([scale*aspect, slant*scale], 1), torch.stack([torch.zeros(b), scale], 1)], 1)
    inv, shift = torch.linalg.inv(fwd), torch.stack([u(-0.15, 0.15), u(-0.15, 0.15)], 1)
    grid = F.affine_grid(torch.cat([inv, -(inv @ shift[..., None])], 2), list(masters.shape), align_corners=False)
    side = masters.shape[-1]
    wobble = u(0, 0.08)[:, None, None, None]*torch.randn(b, 2, 4, 4, generator=gen)   # smooth, elastic displacement
    grid = grid + F.interpolate(wobble, size=(side, side), mode='bilinear', align_corners=True).permute(0, 2, 3, 1)
    ink = F.grid_sample(masters, grid, align_corners=False)
    # stroke width: the blurred ink thresholded at a random share of its peak, lower for bolder strokes
    soft = _gauss(ink, side/40, 2*(side//20)+1)
    level = u(0.15, 0.6)[:, None, None, None]*soft.amax((1, 2, 3), keepdim=True)
    ink = F.avg_pool2d(torch.sigmoid((soft - level)/0.04), 2)
    ink = _gauss(ink, u(0.05, 0.9), 5)
    paper, dark = u(170, 255)[:, None, None, None], u(0, 110)[:, None, None, None]
    out = paper + (dark - paper)*ink + u(0, 10)[:, None, None, None]*torch.randn(ink.shape, generator=gen)
    return out.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()


def _render(seed, n_images, size, progress, chunk=2048):
    "Arrays to cache: per split, grey images, labels and class names; stats; meta."
    # the stats: mean and std; the meta as JSON
    fonts = _fonts()
    letters = _letters(fonts)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    res, meta = {}, {'scripts': {}, 'unicode_names': {}, 'fonts': {}, 'fonts_per_class': {},
                     'matplotlib': matplotlib.__version__}
    for split in SPLITS:
        chars = [ch for ch in letters if _script(ch) in SCRIPTS[split]]
        designs, which, labels = [], [], []
        for label, ch in with_bar(list(enumerate(chars)), progress):   # a bar a split
            names = letters[ch]
            # Cycle through the fonts from a random start, so that every font of the letter is drawn.
            start, first = rng.integers(len(names)), len(designs)
            designs += [_master(_draw(fonts[n], ch, 3*size), 2*size) for n in names]
            n = max(n_images, len(names))
            which.append(first + (start + np.arange(n)) % len(names))
            labels.append(np.full(n, label))
            meta['unicode_names'][ch] = unicodedata.name(ch)
            meta['fonts'][ch] = names
            meta['fonts_per_class'][ch] = len(names)
        designs, which = torch.from_numpy(np.stack(designs))[:, None], np.concatenate(which)
        ims = [_distort(designs[which[i:i+chunk]], gen, size) for i in range(0, len(which), chunk)]
        meta['scripts'][split] = [s for s in SCRIPTS[split] if any(_script(ch) == s for ch in chars)]
        res[f'x_{split}'], res[f'y_{split}'], res[f'c_{split}'] = np.concatenate(ims), np.concatenate(labels), np.array(chars)
    x = res['x_train']/255
    res['mean'], res['std'] = np.full(3, x.mean()), np.full(3, x.std())
    res['meta'] = np.array(json.dumps(meta, ensure_ascii=False))
    return res


def glyphs(root='~/data',      # folder that holds the `glyphs/` cache
           seed=0,             # seed of the random distortions
           n_images=300,       # least number of images per class (more when a letter has more fonts)
           size=32,            # side of the square images
           progress=True,      # show a progress bar while rendering
          ) -> FewShotSplits:
    "Letters drawn in matplotlib's fonts with random distortions, split by script."
    # 250 base classes of `n_images` each by default: the shape of the paper's benchmarks (64 to 351 base classes of 600)
    if n_images < 1 or size < 8: raise ValueError(f"need n_images >= 1 and size >= 8, got {n_images} and {size}")
    path = Path(root).expanduser()/'glyphs'/f'glyphs_v{VERSION}_seed{seed}_n{n_images}_s{size}.npz'
    if not path.exists():  # rendered once, then cached
        path.parent.mkdir(parents=True, exist_ok=True)
        res = _render(seed, n_images, size, progress)
        write_atomic(path, lambda f: np.savez_compressed(f, **res))
    with np.load(path, allow_pickle=False) as z:
        splits = {s: Split(np.repeat(z[f'x_{s}'][..., None], 3, -1), z[f'y_{s}'], list(z[f'c_{s}'])) for s in SPLITS}
        return FewShotSplits('glyphs', **splits, mean=tuple(z['mean'].tolist()), std=tuple(z['std'].tolist()),
                             meta=json.loads(str(z['meta'])))
