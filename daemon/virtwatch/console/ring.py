"""The console's memory: a byte ring of bounded size, and its reading as text lines."""

from __future__ import annotations


class RingBuffer:
    """The last ``capacity`` bytes written (older bytes are dropped).

    Attributes:
        total: bytes ever appended.
        dropped: bytes dropped because the ring was full.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._buf = bytearray()
        self.total = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._buf)

    def append(self, data: bytes) -> None:
        """Add ``data``; keeps at most :attr:`capacity` bytes."""
        self.total += len(data)
        if len(data) >= self.capacity:
            self.dropped += len(self._buf) + len(data) - self.capacity
            self._buf[:] = data[-self.capacity:]
            return
        self._buf += data
        excess = len(self._buf) - self.capacity
        if excess > 0:
            del self._buf[:excess]
            self.dropped += excess

    def data(self) -> bytes:
        """A copy of the buffered bytes, oldest first."""
        return bytes(self._buf)

    def lines(self, n: int) -> list[str]:
        """The last ``n`` lines as text (see :func:`text_lines`)."""
        return text_lines(self._buf, n)


def text_lines(data: bytes | bytearray, n: int) -> list[str]:
    """The last ``n`` lines of console bytes, decoded as UTF-8 (invalid bytes
    replaced), CR/LF normalised, a trailing partial line included, a final
    empty line dropped. ``n <= 0`` gives []."""
    if n <= 0 or not data:
        return []
    text = bytes(data).decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines[-n:]
