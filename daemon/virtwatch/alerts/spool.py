"""The alert spool: alerts no Alertmanager has accepted yet, kept in the state directory so
that they survive a daemon restart (or a reload) during an Alertmanager outage.

The file (``<state_dir>/alerts-spool.json``) is JSON, replaced atomically (temporary file in
the same directory, fsync, rename), so a crash leaves the previous or the next version, never
half of one::

    {"version": 1,
     "alertmanagers": {"http://am1:9093": [
         {"labels": {...}, "annotations": {...}, "starts_at": 1700000000.0, "ends_at": null, "late_at": null,
          "fired_accepted": false, "fired_anywhere": false}, ...]}}

``fired_accepted`` says that this Alertmanager had accepted the alert while it fired (so a
late resolve is an ordinary resolve, not an incident it never saw); ``fired_anywhere`` that
one of the configured Alertmanagers had (the cluster notified it: the others skip its resolve). Its size is bounded by
the client's ``queue_size`` per Alertmanager. :func:`encode` and :func:`decode` are pure;
:class:`Spool` does the file I/O (call it off the event loop).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..infra.sqlite import move_aside
from .record import AlertRecord

VERSION = 1

#: ``{alertmanager URL: [(record, fired_accepted, fired_anywhere), ...]}``, oldest first.
Pending = dict[str, list[tuple[AlertRecord, bool, bool]]]


class SpoolError(ValueError):
    """The spool file is not a spool this version can read (the message says where)."""


def encode(pending: Mapping[str, Sequence[tuple[AlertRecord, bool, bool]]]) -> bytes:
    """The spool file's bytes for ``pending`` (URLs with no alerts left out)."""
    doc = {
        "version": VERSION,
        "alertmanagers": {
            url: [{"labels": dict(r.labels), "annotations": dict(r.annotations), "starts_at": r.starts_at,
                   "ends_at": r.ends_at, "late_at": r.late_at, "fired_accepted": here, "fired_anywhere": anywhere}
                  for r, here, anywhere in recs]
            for url, recs in pending.items() if recs
        },
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _strings(v: Any, where: str) -> dict[str, str]:
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise SpoolError(f"{where}: expected an object of strings")
    return v


def _time(v: Any, where: str, optional: bool = False) -> float | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise SpoolError(f"{where}: expected epoch seconds, got {v!r}")
    return float(v)


def decode(data: bytes) -> Pending:
    """Parse spool bytes. Raises :class:`SpoolError` for anything but a well-formed spool."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SpoolError(f"not JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise SpoolError(f"expected version {VERSION}, got {doc.get('version') if isinstance(doc, dict) else doc!r}")
    ams = doc.get("alertmanagers")
    if not isinstance(ams, dict):
        raise SpoolError("alertmanagers: expected an object")
    out: Pending = {}
    for url, items in ams.items():
        if not isinstance(items, list):
            raise SpoolError(f"alertmanagers[{url!r}]: expected a list")
        recs = []
        for i, item in enumerate(items):
            where = f"alertmanagers[{url!r}][{i}]"
            if not isinstance(item, dict):
                raise SpoolError(f"{where}: expected an object")
            labels = _strings(item.get("labels"), where + ".labels")
            if not labels.get("alertname"):
                raise SpoolError(f"{where}.labels: no alertname")
            starts = _time(item.get("starts_at"), where + ".starts_at")
            assert starts is not None
            ends = _time(item.get("ends_at"), where + ".ends_at", optional=True)
            late_at = _time(item.get("late_at"), where + ".late_at", optional=True)
            flags = [item.get(k, False) for k in ("fired_accepted", "fired_anywhere")]
            if not all(isinstance(f, bool) for f in flags):
                raise SpoolError(f"{where}: fired_accepted and fired_anywhere must be true or false")
            recs.append((AlertRecord(labels, _strings(item.get("annotations", {}), where + ".annotations"), starts,
                                     ends, late_at), flags[0], flags[0] or flags[1]))
        out[url] = recs
    return out


class Spool:
    """The spool file at ``path``. Its methods block (file I/O): run them in a thread."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> tuple[Pending, str | None, Path | None]:
        """``(pending, problem, moved_to)``: a missing file is an empty spool; one that cannot be
        read or parsed is renamed to ``<name>.corrupt-<time>`` (``moved_to``) and ``problem`` says
        why, with an empty spool returned: the daemon starts without those alerts."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}, None, None
        except OSError as err:
            return {}, f"cannot read {self.path}: {err.strerror or err}", None
        try:
            return decode(data), None, None
        except SpoolError as err:
            try:
                moved: Path | None = move_aside(self.path)
            except OSError:
                moved = None
            return {}, str(err), moved

    def write(self, data: bytes) -> None:
        """Replace the file with ``data`` atomically (the directory is created, mode 0750).
        Raises OSError."""
        self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
