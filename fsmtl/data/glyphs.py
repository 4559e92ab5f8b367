"The embedded benchmark: letters drawn in matplotlib's fonts, split by script."
from __future__ import annotations
import json, unicodedata
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.ft2font import FT2Font, LoadFlags
from PIL import Image, ImageFilter
from scipy.ndimage import distance_transform_edt
from tqdm.auto import tqdm

from ..files import write_atomic
from ..runlog import interactive
from .core import SPLITS, FewShotSplits, Split

__all__ = ['glyphs']

VERSION = 1
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


def _distort(ink, rng, size):
    "`ink` pasted dark on light into a `size` square, randomly distorted."
    # a random stroke width, scale, aspect and shift
    im = Image.fromarray(ink)
    stroke = rng.integers(-1, 2)  # thinner, as drawn or bolder, by a fraction of a pixel at the final size
    if stroke: im = im.filter(ImageFilter.MaxFilter(3) if stroke > 0 else ImageFilter.MinFilter(3))
    scale = size*rng.uniform(0.6, 0.9)/max(ink.shape)
    w = min(size, max(1, round(ink.shape[1]*scale*rng.uniform(0.8, 1.2))))
    h = min(size, max(1, round(ink.shape[0]*scale)))
    x, y = rng.integers(0, size-w+1), rng.integers(0, size-h+1)
    out = np.full((size, size), 255, np.uint8)
    out[y:y+h, x:x+w] = 255 - np.asarray(im.resize((w, h), Image.LANCZOS))
    return out


def _render(seed, n_images, size, progress):
    "Arrays to cache: per split, grey images, labels and class names; stats; meta."
    # the stats: mean and std; the meta as JSON
    fonts = _fonts()
    letters = _letters(fonts)
    rng = np.random.default_rng(seed)
    res, meta = {}, {'scripts': {}, 'unicode_names': {}, 'fonts': {}, 'fonts_per_class': {},
                     'matplotlib': matplotlib.__version__}
    # fastprogress 1.1 writes to stdout even with display=False; tqdm stays quiet when disabled.
    bar = tqdm(total=len(letters), desc='rendering glyphs', disable=not (progress and interactive()), leave=False)
    for split in SPLITS:
        chars = [ch for ch in letters if _script(ch) in SCRIPTS[split]]
        ims, labels = [], []
        for label, ch in enumerate(chars):
            names = letters[ch]
            # Cycle through the fonts from a random start, so that every font of the letter is drawn.
            start = rng.integers(len(names))
            for i in range(max(n_images, len(names))):
                ink = _draw(fonts[names[(start+i) % len(names)]], ch, 3*size, rng.uniform(-15, 15))
                ims.append(_distort(ink, rng, size))
                labels.append(label)
            meta['unicode_names'][ch] = unicodedata.name(ch)
            meta['fonts'][ch] = names
            meta['fonts_per_class'][ch] = len(names)
            bar.update()
        meta['scripts'][split] = [s for s in SCRIPTS[split] if any(_script(ch) == s for ch in chars)]
        res[f'x_{split}'], res[f'y_{split}'], res[f'c_{split}'] = np.stack(ims), np.array(labels), np.array(chars)
    bar.close()
    x = res['x_train']/255
    res['mean'], res['std'] = np.full(3, x.mean()), np.full(3, x.std())
    res['meta'] = np.array(json.dumps(meta, ensure_ascii=False))
    return res


def glyphs(root='~/data',      # folder that holds the `glyphs/` cache
           seed=0,             # seed of the random distortions
           n_images=20,        # least number of images per class (more when a letter has more fonts)
           size=32,            # side of the square images
           progress=True,      # show a progress bar while rendering
          ) -> FewShotSplits:
    "Letters drawn in matplotlib's fonts with random distortions, split by script."
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
