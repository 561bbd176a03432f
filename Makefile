# One command sets up and runs the demo, one sets up and runs the tests (see README).
VENV ?= .venv
PYTHON ?= python3
# Every package comes from the lock, pinned and hashed (pip-compile of pyproject.toml's ranges): a figure in
# BENCHMARKS.md comes from exactly these versions. Its torch is PyTorch's CPU build (2.13.0+cpu: on the
# dev/CI machines' disk; elsewhere PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).
LOCK ?= requirements/cpu.txt
# On a GPU box, the CUDA build of the same torch after the lock, e.g.
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?=
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)
# open_clip's training loader, for tests/test_openclip.py, in a venv of its own (inside .venv, so git ignores it
# and `make clean` removes it): open_clip_train reads shards with webdataset <= 0.2.86 only (the lock: 0.2.111),
# and PyPI's torchvision for torch 2.13.0, a CUDA build, breaks transformers beside the CPU torch (README,
# "Versions that interoperate"). Its lock, from requirements/openclip.in, has the same CPU torch.
OPENCLIP_VENV ?= $(VENV)/openclip
OPENCLIP_LOCK ?= requirements/openclip.txt
OPENCLIP_STAMP := $(OPENCLIP_VENV)/.installed-$(shell cat $(OPENCLIP_LOCK) 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: setup openclip-setup system-packages demo test bench lock clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -qq --require-hashes --no-deps -r $(LOCK)
	$(VENV)/bin/pip install -qq --no-deps --no-build-isolation -e .
	$(if $(TORCH_SPEC),$(VENV)/bin/pip install -qq $(TORCH_SPEC))
	rm -f $(VENV)/.installed-* && touch $(STAMP)

$(OPENCLIP_STAMP): $(OPENCLIP_LOCK)
	test -x $(OPENCLIP_VENV)/bin/python || $(PYTHON) -m venv $(OPENCLIP_VENV)
	$(OPENCLIP_VENV)/bin/pip install -qq --require-hashes --no-deps -r $(OPENCLIP_LOCK)
	rm -f $(OPENCLIP_VENV)/.installed-* && touch $(OPENCLIP_STAMP)

# The locks again from pyproject.toml's ranges (after a change there; tests/test_lock.py says when) and from
# requirements/openclip.in (tests/test_openclip.py checks that one).
lock:
	test -x .venv-lock/bin/pip-compile || ($(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install -qq pip-tools==7.7.0)
	.venv-lock/bin/pip-compile -q --extra=test --extra=tracking --generate-hashes --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links --output-file=$(LOCK) pyproject.toml
	.venv-lock/bin/pip-compile -q --generate-hashes --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links --output-file=$(OPENCLIP_LOCK) requirements/openclip.in

setup: $(STAMP)

openclip-setup: $(OPENCLIP_STAMP)

demo: setup
	$(VENV)/bin/vlp run configs/demo.yaml

# The report test opens the HTML report in headless Chromium; the downloader's tests fetch from nginx
# (Debian's packages both: third-party software the tests start themselves, on loopback).
system-packages:
	command -v chromium >/dev/null && command -v nginx >/dev/null || (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium nginx >/dev/null)

test: setup openclip-setup system-packages
	OPENCLIP_PYTHON=$(abspath $(OPENCLIP_VENV))/bin/python $(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python bench/download.py
	$(VENV)/bin/python bench/train.py
	$(VENV)/bin/python bench/dedup.py

clean:
	rm -rf $(VENV) .venv-lock runs bench/out
