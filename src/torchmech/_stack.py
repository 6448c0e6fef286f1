"""Where a warning should point: the user's call, not the library frames it passed through."""

from __future__ import annotations

import os
import sys

import torch


def caller_level() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the calling function that points at the first frame outside
    torchmech and torch (the user's call), however deep the library frames in between."""
    roots = tuple(os.path.dirname(m.__file__) + os.sep for m in (sys.modules["torchmech"], torch))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(roots):
        frame, level = frame.f_back, level + 1
    return level
