"""Console capture, a feature of its own: each selected guest's serial console
in a bounded ring, crash records in ``console.sqlite``, and their readers.

The daemon (``app.py``) needs :class:`ConsoleCapture`; the configuration
(``config.py``) needs :class:`ConsoleSettings`.
"""

from .capture import ConsoleCapture
from .settings import ConsoleSettings

__all__ = ["ConsoleCapture", "ConsoleSettings"]
