# fsmtl: `make train` trains on the embedded benchmark, `make test` runs every test; both install first if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fsmtl-installed

.PHONY: install test pytest nbtest train bench clean

# The stamp is newer than every file that decides what gets installed, so a second run installs nothing.
$(STAMP): settings.ini setup.py tools/install.sh
	bash tools/install.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

pytest: $(STAMP)
	$(PY) -m pytest -q tests

nbtest: $(STAMP)
	$(VENV)/bin/nbdev_test --path nbs --n_workers 1

test: pytest nbtest

train: $(STAMP)
	$(VENV)/bin/fsmtl train --dataset glyphs

bench: $(STAMP)
	$(PY) bench/loader.py

clean:
	rm -rf $(VENV) build *.egg-info
