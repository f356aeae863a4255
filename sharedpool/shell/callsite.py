"""Where a lease was asked for: the first frame outside sharedpool and redis-py.

The manager's leak warnings name it; the text is computed once per
(code, line) and the manager learns it once per process (``Attachment.site_id``).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any

import redis

_OUR_DIRS = tuple(
    os.path.dirname(module.__file__) + os.sep
    for module in (sys.modules["sharedpool"], redis)
    if module.__file__
)
_LIB_DIRS = _OUR_DIRS + (os.path.dirname(contextmanager.__code__.co_filename) + os.sep + "contextlib",)
_CALLER_TEXT: dict[tuple[Any, int], str] = {}


def caller() -> str:
    """The caller of our caller, skipping library frames: ``file:line in function``."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_LIB_DIRS):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return ""
    code = frame.f_code
    key = (code, frame.f_lineno)
    text = _CALLER_TEXT.get(key)
    if text is None:
        text = f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"
        if len(_CALLER_TEXT) < 10_000:
            _CALLER_TEXT[key] = text
    return text
