# `make deb`: build dist/virtwatch_<version>_amd64.deb.  -*- makefile -*-
#
# Included by the top-level Makefile; also usable alone: make -f mk/deb.mk deb
#
# The Debian packaging is in debian/ (debhelper 13 + dh-virtualenv, see DEVELOPERS.md,
# "The .deb"). This target copies the source tree to $(DEB_BUILDDIR)/virtwatch-$(DEB_VERSION)
# (so the build never writes into the checkout), writes debian/changelog there with
# $(DEB_VERSION), runs dpkg-buildpackage -b, and copies the .deb to $(DEB_OUTDIR).
# Build dependencies: `make deb-deps` (apt), or see Build-Depends in debian/control.
# pip fetches the Python dependencies during the build (PyPI or pip's configured index).
#
# Variables:
#   DEB_VERSION   package version       [the version in pyproject.toml]
#   DEB_BUILDDIR  scratch directory     [build/deb]
#   DEB_OUTDIR    where the .deb goes   [dist]

DEB_SRCDIR   := $(patsubst %/,%,$(dir $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))))
DEB_VERSION  ?= $(shell sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$(DEB_SRCDIR)/pyproject.toml" | head -n1)
DEB_BUILDDIR ?= $(DEB_SRCDIR)/build/deb
DEB_OUTDIR   ?= $(DEB_SRCDIR)/dist
DEB_ARCH     := $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
DEB_STAGE    := $(DEB_BUILDDIR)/virtwatch-$(DEB_VERSION)
DEB_FILE     := virtwatch_$(DEB_VERSION)_$(DEB_ARCH).deb
DEB_BUILD_DEPS := debhelper dh-virtualenv dpkg-dev python3 python3-venv python3-dev libvirt-dev pkg-config \
                  gcc python3-argparse-manpage python3-shtab

.PHONY: deb deb-deps

deb:
	@test -n "$(DEB_VERSION)" || { echo "deb: no version in pyproject.toml (set DEB_VERSION=)" >&2; exit 1; }
	@command -v dpkg-buildpackage >/dev/null && test -x /usr/bin/dh_virtualenv \
	  || { echo "deb: build dependencies missing: make deb-deps" >&2; exit 1; }
	rm -rf "$(DEB_STAGE)" && mkdir -p "$(DEB_STAGE)" "$(DEB_OUTDIR)"
	tar -C "$(DEB_SRCDIR)" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
	  --exclude=./.demo --exclude=./.mypy_cache --exclude=./.ruff_cache --exclude=./.pytest_cache \
	  --exclude=__pycache__ --exclude='*.egg-info' -cf - . | tar -C "$(DEB_STAGE)" -xf -
	printf '%s\n' "virtwatch ($(DEB_VERSION)) unstable; urgency=medium" "" \
	  "  * Built from the virtwatch source tree with make deb; changes: CHANGELOG.md upstream." "" \
	  " -- virtwatch maintainers <maintainers@virtwatch.dev>  $$(date -R)" > "$(DEB_STAGE)/debian/changelog"
	cd "$(DEB_STAGE)" && dpkg-buildpackage -b -us -uc
	cp "$(DEB_BUILDDIR)/$(DEB_FILE)" "$(DEB_OUTDIR)/$(DEB_FILE)"
	@echo "deb: $(DEB_OUTDIR)/$(DEB_FILE)"

deb-deps:
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(DEB_BUILD_DEPS)
