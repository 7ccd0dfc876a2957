# `make install`: install virtwatch as a system service.  -*- makefile -*-
#
# Included by the top-level Makefile; also usable alone:
#     make -f mk/install.mk install
#
# What it does (idempotent; safe to re-run for upgrades):
#   1. a Python venv at $(INSTALL_VENV) (default /opt/virtwatch) with virtwatch
#      and its dependencies pip-installed from this source tree;
#   2. $(BINDIR)/virtwatch -> $(INSTALL_VENV)/bin/virtwatch (symlink);
#   3. the units into $(UNITDIR), sysusers.d/tmpfiles.d into $(SYSCONFDIR);
#   4. the virtwatch user (not in the libvirt group: monitoring uses libvirt's read-only
#      socket): systemd-sysusers, else useradd;
#   5. /etc/virtwatch/virtwatch.toml from the example, only if absent;
#      /var/lib/virtwatch; docs and examples under $(DOCDIR);
#   6. systemctl daemon-reload when systemd is running.
# It never enables or starts anything; it prints the commands to do so.
#
# `make install-prometheus-rules` (not part of `install`: Prometheus usually runs
# elsewhere) installs config/prometheus/virtwatch-alerts.yml into
# $(PROMETHEUS_RULES_DIR) with every runbook_url under $(RUNBOOK_BASE_URL).
#
# DESTDIR=/some/dir stages everything under that directory instead (for
# tests and packaging): no user is created, nothing is chown'ed and systemd
# is not touched. Note that a venv is not relocatable: its scripts name
# $(DESTDIR)$(INSTALL_VENV) in their #! line.
#
# Variables (override on the command line):
#   INSTALL_PYTHON     interpreter the venv is made from (>= 3.11)  [python3]
#   INSTALL_VENV       venv location                              [/opt/virtwatch]
#   INSTALL_PIP_FLAGS  extra pip flags, e.g. --no-index --find-links=wheels/
#   EXAMPLE_CONFIG     the example configuration to seed from
#   RUNBOOK_BASE_URL   where docs/runbooks/*.md are published  [https://virtwatch.dev/docs/runbooks]
#   PROMETHEUS_RULES_DIR  install-prometheus-rules' target directory  [$(SYSCONFDIR)/prometheus]
#   PREFIX BINDIR SYSCONFDIR UNITDIR STATEDIR DOCDIR DESTDIR

INSTALL_SRCDIR     := $(patsubst %/,%,$(dir $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))))
INSTALL_PYTHON     ?= python3
INSTALL_VENV       ?= /opt/virtwatch
INSTALL_PIP_FLAGS  ?=
PREFIX             ?= /usr/local
BINDIR             ?= $(PREFIX)/bin
SYSCONFDIR         ?= /etc
UNITDIR            ?= $(SYSCONFDIR)/systemd/system
STATEDIR           ?= /var/lib/virtwatch
DOCDIR             ?= $(PREFIX)/share/doc/virtwatch
EXAMPLE_CONFIG     ?= $(INSTALL_SRCDIR)/config/virtwatch.example.toml
DESTDIR            ?=
PROMETHEUS_RULES_DIR ?= $(SYSCONFDIR)/prometheus
# The base the shipped rule file names; install-prometheus-rules replaces it with RUNBOOK_BASE_URL.
RUNBOOK_SHIPPED_BASE := https://virtwatch.dev/docs/runbooks
RUNBOOK_BASE_URL   ?= $(RUNBOOK_SHIPPED_BASE)

INSTALL_UNITS := virtwatch.service virtwatch.socket virtwatch-guests-save.service
# The units name /usr/local/bin/virtwatch; rewrite it when BINDIR differs.
INSTALL_SED   := sed -e 's|/usr/local/bin/virtwatch|$(BINDIR)/virtwatch|g'

.PHONY: install install-venv install-files install-user install-dirs install-config install-reload \
        install-prometheus-rules

install: install-venv install-files install-user install-dirs install-config install-reload
	@echo
	@echo "virtwatch installed. Next:"
	@echo "  edit $(SYSCONFDIR)/virtwatch/virtwatch.toml, then: virtwatch check-config $(SYSCONFDIR)/virtwatch/virtwatch.toml"
	@echo "  systemctl enable --now virtwatch.socket virtwatch.service"
	@echo "  operators: usermod -aG virtwatch NAME (the socket is root:virtwatch 0660)"
	@echo "  policy actions or console capture: grant read-write libvirt access (virtwatch check-config says how)"
	@echo "  optional, host-shutdown save path: systemctl enable --now virtwatch-guests-save.service"

# pip builds from a scratch copy so setuptools' build/ never lands in the source tree.
install-venv:
	@test -f "$(EXAMPLE_CONFIG)" || { echo "install: $(EXAMPLE_CONFIG) is missing" >&2; exit 1; }
	@"$(INSTALL_PYTHON)" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  || { echo "install: $(INSTALL_PYTHON) is older than Python 3.11" >&2; exit 1; }
	test -x "$(DESTDIR)$(INSTALL_VENV)/bin/python" || "$(INSTALL_PYTHON)" -m venv "$(DESTDIR)$(INSTALL_VENV)"
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT \
	  && cp -R "$(INSTALL_SRCDIR)/pyproject.toml" "$(INSTALL_SRCDIR)/daemon" "$$tmp/" \
	  && if [ -f "$(INSTALL_SRCDIR)/README.md" ]; then cp "$(INSTALL_SRCDIR)/README.md" "$$tmp/"; fi \
	  && rm -rf "$$tmp"/daemon/*.egg-info \
	  && "$(DESTDIR)$(INSTALL_VENV)/bin/python" -m pip install --quiet --disable-pip-version-check \
	       --upgrade $(INSTALL_PIP_FLAGS) "$$tmp"
	install -d -m 0755 "$(DESTDIR)$(BINDIR)"
	ln -sfn "$(INSTALL_VENV)/bin/virtwatch" "$(DESTDIR)$(BINDIR)/virtwatch"

install-files:
	install -d -m 0755 "$(DESTDIR)$(UNITDIR)" "$(DESTDIR)$(SYSCONFDIR)/sysusers.d" \
	  "$(DESTDIR)$(SYSCONFDIR)/tmpfiles.d" "$(DESTDIR)$(DOCDIR)"
	for u in $(INSTALL_UNITS); do \
	  $(INSTALL_SED) "$(INSTALL_SRCDIR)/systemd/$$u" > "$(DESTDIR)$(UNITDIR)/$$u.tmp" \
	  && chmod 0644 "$(DESTDIR)$(UNITDIR)/$$u.tmp" \
	  && mv -f "$(DESTDIR)$(UNITDIR)/$$u.tmp" "$(DESTDIR)$(UNITDIR)/$$u" || exit 1; \
	done
	install -m 0644 "$(INSTALL_SRCDIR)/systemd/sysusers.d/virtwatch.conf" "$(DESTDIR)$(SYSCONFDIR)/sysusers.d/virtwatch.conf"
	install -m 0644 "$(INSTALL_SRCDIR)/systemd/tmpfiles.d/virtwatch.conf" "$(DESTDIR)$(SYSCONFDIR)/tmpfiles.d/virtwatch.conf"
	install -m 0644 "$(EXAMPLE_CONFIG)" "$(DESTDIR)$(DOCDIR)/virtwatch.example.toml"
	install -m 0644 "$(INSTALL_SRCDIR)/packaging/web-config.example.yml" "$(DESTDIR)$(DOCDIR)/web-config.example.yml"
	install -m 0644 "$(INSTALL_SRCDIR)/packaging/polkit/50-virtwatch-libvirt.rules" "$(DESTDIR)$(DOCDIR)/50-virtwatch-libvirt.rules"
	if [ -f "$(INSTALL_SRCDIR)/README.md" ]; then install -m 0644 "$(INSTALL_SRCDIR)/README.md" "$(DESTDIR)$(DOCDIR)/README.md"; fi
	install -d -m 0755 "$(DESTDIR)$(DOCDIR)/runbooks"
	install -m 0644 "$(INSTALL_SRCDIR)"/docs/runbooks/*.md "$(DESTDIR)$(DOCDIR)/runbooks/"
	install -m 0644 "$(INSTALL_SRCDIR)/config/prometheus/virtwatch-alerts.yml" "$(DESTDIR)$(DOCDIR)/virtwatch-alerts.yml"

install-user:
ifeq ($(DESTDIR),)
	if command -v systemd-sysusers >/dev/null 2>&1; then \
	  systemd-sysusers "$(SYSCONFDIR)/sysusers.d/virtwatch.conf"; \
	else \
	  getent passwd virtwatch >/dev/null || useradd --system --user-group --home-dir "$(STATEDIR)" \
	    --no-create-home --shell /usr/sbin/nologin --comment "virtwatch libvirt monitor" virtwatch; \
	fi
else
	@echo "install: DESTDIR set: not creating the virtwatch user"
endif

install-dirs:
ifeq ($(DESTDIR),)
	install -d -m 0750 -o root -g virtwatch "$(SYSCONFDIR)/virtwatch"
	install -d -m 0750 -o virtwatch -g virtwatch "$(STATEDIR)"
else
	install -d -m 0750 "$(DESTDIR)$(SYSCONFDIR)/virtwatch" "$(DESTDIR)$(STATEDIR)"
endif

# Never overwrite an existing configuration: upgrades keep the operator's file
# (compare it with $(DOCDIR)/virtwatch.example.toml for new options).
install-config:
	@if [ -e "$(DESTDIR)$(SYSCONFDIR)/virtwatch/virtwatch.toml" ]; then \
	  echo "install: keeping existing $(DESTDIR)$(SYSCONFDIR)/virtwatch/virtwatch.toml"; \
	else \
	  echo "install: $(EXAMPLE_CONFIG) -> $(DESTDIR)$(SYSCONFDIR)/virtwatch/virtwatch.toml"; \
	  install -m 0640 "$(EXAMPLE_CONFIG)" "$(DESTDIR)$(SYSCONFDIR)/virtwatch/virtwatch.toml"; \
	  if [ -z "$(DESTDIR)" ]; then chgrp virtwatch "$(SYSCONFDIR)/virtwatch/virtwatch.toml"; fi; \
	fi

install-reload:
ifeq ($(DESTDIR),)
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
endif

# The Prometheus rules with their runbook links rewritten (the base must not contain '|').
install-prometheus-rules:
	@case "$(RUNBOOK_BASE_URL)" in http://?*|https://?*) ;; \
	  *) echo "install: RUNBOOK_BASE_URL must be an http:// or https:// URL" >&2; exit 1;; esac
	install -d -m 0755 "$(DESTDIR)$(PROMETHEUS_RULES_DIR)"
	sed -e 's|$(RUNBOOK_SHIPPED_BASE)/|$(patsubst %/,%,$(RUNBOOK_BASE_URL))/|g' \
	  "$(INSTALL_SRCDIR)/config/prometheus/virtwatch-alerts.yml" > "$(DESTDIR)$(PROMETHEUS_RULES_DIR)/virtwatch-alerts.yml.tmp"
	chmod 0644 "$(DESTDIR)$(PROMETHEUS_RULES_DIR)/virtwatch-alerts.yml.tmp"
	mv -f "$(DESTDIR)$(PROMETHEUS_RULES_DIR)/virtwatch-alerts.yml.tmp" "$(DESTDIR)$(PROMETHEUS_RULES_DIR)/virtwatch-alerts.yml"
	@echo "install: check it with promtool check rules $(PROMETHEUS_RULES_DIR)/virtwatch-alerts.yml, then reload Prometheus"
