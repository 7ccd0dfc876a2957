#!/usr/bin/env python3
"""Write virtwatch(8) and the bash/zsh completions from the argparse parser (build_parser).

Run with the interpreter virtwatch is installed in (the package's venv). The generators
come from Debian's python3-argparse-manpage and python3-shtab, which live outside that
venv: their directory is appended to sys.path, so the venv's own packages still win.

    gen-cli-docs.py [--man FILE] [--bash FILE] [--zsh FILE]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.append("/usr/lib/python3/dist-packages")

import shtab
from build_manpages.manpage import Manpage

from virtwatch import __version__
from virtwatch.cli import build_parser

SECTIONS = [
    ("Files", "/etc/virtwatch/virtwatch.toml: the configuration (a conffile). /etc/virtwatch/conf.d/*.toml: "
     "drop-ins, merged over it in file-name order. /var/lib/virtwatch: policy state, event journal, console crash "
     "records. /run/virtwatch/virtwatch.sock: the operator socket (root:virtwatch 0660). "
     "/usr/share/doc/virtwatch/examples/virtwatch.example.toml: every key with its default."),
    ("Privileges", "Monitoring needs only libvirt's read-only socket: the service runs as the virtwatch user "
     "without the libvirt group. Policy actions and console capture need read-write access: enable "
     "/usr/share/virtwatch/polkit/50-virtwatch-libvirt.rules (copy it to /etc/polkit-1/rules.d/) or run "
     "usermod -aG libvirt virtwatch, then systemctl restart virtwatch. Without it the daemon monitors read-only "
     "and logs one feature_unavailable warning per feature that cannot work. virtwatch check-config says which "
     "features of a file need it."),
    ("Exit status", "0 success; 1 runtime failure or daemon unreachable; 2 invalid configuration or usage; "
     "3 unknown guest; 4 feature off."),
    ("See also", "systemctl(1), journalctl(1), virsh(1); /usr/share/doc/virtwatch/README.md.gz"),
]


def _roff(text: str) -> str:
    return text.replace("\\", "\\\\").replace("-", "\\-")


def manpage() -> str:
    parser = build_parser()
    parser.man_short_description = "event-driven monitoring and guest-keeping daemon for libvirt hosts"
    # Our sections are appended as plain paragraphs: argparse-manpage 1.2 would hard-wrap
    # them with a .br every 80 columns.
    text = str(Manpage(parser)) + "".join(f".SH {h.upper()}\n{_roff(c)}\n" for h, c in SECTIONS)
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or None
    date = datetime.datetime.fromtimestamp(epoch, datetime.UTC) if epoch else datetime.datetime.now(datetime.UTC)
    head, _, rest = text.partition("\n")
    assert head.startswith(".TH virtwatch"), head  # argparse-manpage 1.2 writes section 1: this is (8)
    return f'.TH VIRTWATCH 8 "{date:%Y-%m-%d}" "virtwatch {__version__}" "System Administration"\n{rest}'


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--man")
    ap.add_argument("--bash")
    ap.add_argument("--zsh")
    args = ap.parse_args()
    outputs = {args.man: manpage} if args.man else {}
    for shell in ("bash", "zsh"):
        path = getattr(args, shell)
        if path:
            outputs[path] = lambda shell=shell: shtab.complete(build_parser(), shell=shell)
    for path, make in outputs.items():
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(make())
    return 0


if __name__ == "__main__":
    sys.exit(main())
