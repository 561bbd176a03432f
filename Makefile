# One command sets up and runs the demo, one sets up and runs the tests (see README).
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch 2.13.0 lies on the dev/CI machines' disk; on a GPU box, set TORCH_SPEC to your CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup system-packages demo test bench clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -qq "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -qq -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/vlp run configs/demo.yaml

# The report test opens the HTML report in headless Chromium; the downloader's tests fetch from nginx
# (Debian's packages both: third-party software the tests start themselves, on loopback).
system-packages:
	command -v chromium >/dev/null && command -v nginx >/dev/null || (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium nginx >/dev/null)

test: setup system-packages
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python bench/download.py
	$(VENV)/bin/python bench/train.py
	$(VENV)/bin/python bench/dedup.py

clean:
	rm -rf $(VENV) runs bench/out
