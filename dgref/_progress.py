"""Progress bars that tests and the book can switch off in one place.

``progress=None`` (the default of every loop) means: use the package default, which is on,
unless the environment variable ``DGREF_PROGRESS=0`` is set or ``set_progress(False)`` was called.
"""
from __future__ import annotations

import os
import warnings

_DEFAULT = {"enabled": os.environ.get("DGREF_PROGRESS", "1") not in ("0", "false", "False", "")}


def set_progress(enabled: bool) -> None:
    """Turn progress bars of all dgref loops on or off (the default for ``progress=None``).

    The book's chapters switch them off (:func:`dgref.book.setup_chapter` calls
    ``set_progress(False)``), so no bar is printed into the book.
    """
    _DEFAULT["enabled"] = bool(enabled)


def progress_enabled(progress: bool | None) -> bool:
    return _DEFAULT["enabled"] if progress is None else bool(progress)


def progress_bar(iterable=None, *, total=None, desc=None, progress: bool | None = None, **kwargs):
    """A tqdm bar, or the bare iterable when progress is off."""
    if not progress_enabled(progress):
        return _Null(iterable)
    return _tqdm()(iterable, total=total, desc=desc, leave=False, **kwargs)


def _tqdm():
    """``tqdm.auto.tqdm``, imported only when a bar is shown: in a kernel without ipywidgets
    importing it prints a TqdmWarning, which would otherwise land in every chapter's output."""
    from tqdm import TqdmExperimentalWarning, TqdmWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TqdmWarning)
        warnings.simplefilter("ignore", TqdmExperimentalWarning)
        from tqdm.auto import tqdm
    return tqdm


class _Null:
    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass
