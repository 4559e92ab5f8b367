"Progress output: whether it redraws in place, and fastprogress bars only where it does."
from __future__ import annotations
import sys

from fastprogress.fastprogress import IN_NOTEBOOK, progress_bar

__all__ = ['interactive', 'with_bar']


def interactive() -> bool:
    "Whether output goes to a notebook or a terminal, where bars redraw in place."
    return IN_NOTEBOOK or sys.stdout.isatty()


def with_bar(items,      # what to iterate over: a DataLoader of episodes, say
             progress):  # show the bar (where output redraws in place)
    "`items`, with a progress bar when asked and the output is a terminal or a notebook."
    # a bar redrawn into a file or a piped log is noise
    return progress_bar(items, leave=False) if progress and interactive() else items
