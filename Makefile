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

# Until the learner lands, this prepares the embedded benchmark and says what is missing.
train: $(STAMP)
	$(VENV)/bin/fsmtl data --dataset glyphs
	@echo "make train: fsmtl has its data pipeline but not yet its learner, evaluation or 'fsmtl train' command: nothing was trained." >&2
	@exit 1

bench: $(STAMP)
	$(PY) bench/loader.py
	$(PY) bench/probe.py
	$(PY) bench/test_memory.py

clean:
	rm -rf $(VENV) build *.egg-info
