"""``virtwatch check-config``: the file and every file it names, as the service would use them."""

from __future__ import annotations

import sys

from ..config import ConfigError, config_warnings, load_settings, write_access_note
from .common import (
    EXIT_CONFIG,
    EXIT_OK,
    print_problems,
)


def check_config(path: str) -> int:
    """Validate ``path`` and the files it names as the service would use them; print ``OK``
    (plus warnings) or every error.

    Beyond the TOML itself: the web config file, its TLS certificate, key and CA files
    (loaded into a TLS context, as at start), its users, ``http.serve_console`` against its
    authentication, and the Alertmanager credential and CA files.
    """
    from ..web.server import load_web_parts

    try:
        settings = load_settings(path)
    except ConfigError as err:
        print_problems(err.source, err.errors)
        return EXIT_CONFIG
    problems = settings.alerts.file_problems()
    try:
        load_web_parts(settings.http.web_config_file, settings.http.serve_console)
    except ConfigError as err:
        where = f"http.web_config_file ({err.source})" if settings.http.web_config_file else "http"
        problems += [line if line.startswith("http.") else f"{where}: {line}" for line in err.errors]
    if problems:
        print_problems(path, problems)
        return EXIT_CONFIG
    note = write_access_note(settings)  # what to grant when the features configured need libvirt write access
    for line in [f"warning: {w}" for w in config_warnings(settings)] + ([f"note: {note}"] if note else []):
        print(line, file=sys.stderr)
    print(f"{path}: OK")
    return EXIT_OK
