"""Argparse ``type=`` converters shared by the CLI modules: a number that must lie in a range.

Each raises ``argparse.ArgumentTypeError`` with the value and the bound, which argparse prints as
``argument --flag: <value>: must be >= 1`` before anything runs.
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 0")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: must be > 0")
    return value
