# vfiouser-srv developer entry points. The QEMU/guest cache lives outside the tree
# (~/.cache/vfiouser-srv, or $VFIOUSER_SRV_CACHE); see qemu-configs/README.md.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
QEMU   := $(PY) -m vfiouser_srv.qemu

.PHONY: setup venv provision demo demo-reference test test-fast lint docs

setup: venv provision

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

provision: venv
	$(QEMU) setup

# Our edu device over vfio-user: the guest's PCI listing, registers, DMA round trip, interrupt.
demo: setup
	@echo "== guest boots with our edu model behind vfio-user-pci (QEMU TCG) =="
	$(QEMU) run edu --demo

# The same program against QEMU's built-in edu (the reference output).
demo-reference: setup
	$(QEMU) run qemu-edu --demo

test: venv
	$(VENV)/bin/pytest

test-fast: venv
	$(VENV)/bin/pytest -m 'not qemu'

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(QEMU) docs --check
	$(PY) -m vfiouser_srv.docgen --check

docs: venv
	$(QEMU) docs
	$(PY) -m vfiouser_srv.docgen
