"""The one error type the data package raises for bad inputs (files, folders, splits)."""
from __future__ import annotations


class DataError(ValueError):
    """A dataset, split, image or IDX file that cannot be used; the message names it."""
