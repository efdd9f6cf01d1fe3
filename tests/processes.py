"""Helpers for tests that start berg-jax in child processes."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def sigint_not_ignored() -> Iterator[None]:
    """Children started inside this block do not inherit an ignored SIGINT.

    A test runner started in the background by a non-interactive shell (`... &`) has SIGINT
    ignored, and an ignored signal stays ignored across exec: the child would never see
    Ctrl-C. A handled one is reset to the default at exec, so handle it meanwhile.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
