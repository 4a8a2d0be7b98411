"""One warning per message per process (unknown config keys, a GGUF key ropekit reads differently, ...)."""

from __future__ import annotations

import warnings

_warned: set[str] = set()


def warn_once(message: str, stacklevel: int = 3) -> None:
    """Emit ``message`` as a UserWarning the first time it is seen in this process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, UserWarning, stacklevel=stacklevel)
