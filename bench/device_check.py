"""Whether fsmtl imports here, with this machine's torch, and which versions it found beside settings.ini's pins.

Run by bench/device_run.sh before it measures anything: `python bench/device_check.py cuda|cpu [KIT_FOLDER]`. It exits
non-zero when fsmtl, fastai, learn2learn or timm does not import, or when `cuda` is asked for and torch sees no GPU.
A package found under KIT_FOLDER came with the device kit (bench/device_kit.sh); the others are this Python's own.
"""
import configparser
import importlib.metadata as md
import sys
from pathlib import Path

import torch

import fastai, learn2learn, timm   # noqa: E401,F401 (what fsmtl imports at start, named for a clear error)
import fsmtl.all, fsmtl.distributed, fsmtl.train   # noqa: E401,F401


def pins():
    "settings.ini's pinned requirements: (name, version)."
    ini = configparser.ConfigParser()
    ini.read(Path(__file__).parents[1] / 'settings.ini')
    return [tuple(r.split('==')) for r in ini['DEFAULT']['requirements'].split() if '==' in r]


def main():
    device, kit = sys.argv[1], (sys.argv[2:] or [None])[0]
    if device == 'cuda' and not torch.cuda.is_available():
        sys.exit(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA GPU here")
    where = torch.cuda.get_device_name() if device == 'cuda' else 'CPU'
    print(f"{where}; Python {sys.version.split()[0]}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
          f"fsmtl from {fsmtl.__path__[0]}")
    for name, pin in pins():
        found = md.distribution(name)
        source = 'the kit' if kit and str(found.locate_file('')).startswith(kit) else 'this Python'
        note = '' if found.version.split('+')[0] == pin else '   (not the pin)'
        print(f"  {name:14s} pin {pin:8s} found {found.version:16s} from {source}{note}")


if __name__ == '__main__':
    main()
