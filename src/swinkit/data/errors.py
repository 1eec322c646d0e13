"""The one error type the data package raises for bad inputs, and the bad-image policy.

Bad-image policy (training, evaluation and calibration alike): an image file that cannot be
decoded is skipped and named in a warning; when more than `MAX_BAD_FRACTION` (1%) of a
folder's images fail, `check_unreadable` raises one `DataError` that names them.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import SwinkitError

MAX_BAD_FRACTION = 0.01


class DataError(SwinkitError, ValueError):
    """A dataset, split, image or IDX file that cannot be used; the message names it."""


def name_some(paths: Sequence[str], limit: int = 5) -> str:
    """'a, b, c, d, e and 7 more': the first `limit` paths of a list, for messages."""
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def check_unreadable(failed: int, total: int, folder: str | Path, paths: Sequence[str],
                     max_fraction: float = MAX_BAD_FRACTION) -> None:
    """Raise `DataError` when more than `max_fraction` of the `total` images under `folder` failed
    to decode (`failed` of them; `paths` names them, or those this process saw)."""
    if failed > max_fraction * total:
        raise DataError(f"{failed} of {total} images under {folder} could not be read "
                        f"(more than {max_fraction:.0%}): {name_some(paths)}")
