# fsmtl: `make train` trains on the embedded benchmark, `make test` runs every test; both install first if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fsmtl-installed

.PHONY: install test quicktest pytest nbtest notebooks docs docs-check train bench clean

# The stamp is newer than every file that decides what gets installed, so a second run installs nothing.
$(STAMP): settings.ini setup.py tools/install.sh
	bash tools/install.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

# timm's own model tests, from the source package of the pinned timm, for tests/test_timm_suite.py; fetched once
TIMM := $(shell sed -n 's/.*timm==\([0-9.]*\).*/\1/p' settings.ini)
TIMM_TESTS := .cache/timm-$(TIMM)/tests/test_models.py
$(TIMM_TESTS): | $(STAMP)
	$(PY) -m pip download -q --no-deps --no-binary :all: timm==$(TIMM) -d .cache
	tar -xzf .cache/timm-$(TIMM).tar.gz -C .cache
	touch $@

# Two workers, one torch thread each (tests/conftest.py); a test file stays on one worker, so its fixtures are made once.
# Files go out in the order collected, longest first (tests/conftest.py), not xdist's order by number of tests.
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

pytest: $(STAMP) $(TIMM_TESTS)
	$(PYTEST) tests

# the tests that neither train nor start subprocesses: under 3 minutes, for working on the code
quicktest: $(STAMP)
	$(PYTEST) -m "not slow" tests

# two notebooks at a time, one torch thread each, as the tests run
nbtest: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/nbdev_test --path nbs --n_workers 2 --timing

test: pytest nbtest

# Run each tutorial as nbdev_test does and save it with its outputs, cleaned (tools/notebooks.py); commit the result.
notebooks: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) tools/notebooks.py run

# The docs site in _docs/: README as home page, the tutorials with their outputs, an API page a module (pandoc).
docs: $(STAMP)
	$(PY) tools/docs.py

# The site in headless Chromium (apt-get install chromium chromium-driver): images, links, screenshots in _docs/screenshots/
docs-check: docs
	$(PY) tools/docs_check.py

# A small ResNet-12 on the embedded benchmark, sized for a 2-core CPU; it prints the test accuracy of the trained
# backbone beside the untrained one's, on the same episodes. Runs go to runs/<dataset>-<model>-<date>/.
# 2 tasks a batch: at this budget, more steps on the same images trained MTL best (bench/mtl_study.py, README).
train: $(STAMP)
	$(VENV)/bin/fsmtl train --dataset glyphs --model resnet12 --model_kwargs '{"channels": [16, 32, 64, 128]}' \
		--scheduler one_cycle --lr 3e-3 --max_epochs 8 --epoch_length 240 --meta_batch_size 2 \
		--val_epoch_length 50 --final_test_epoch_length 500 --baseline --log_dir runs

bench: $(STAMP)
	$(PY) bench/loader.py
	$(PY) bench/probe.py
	$(PY) bench/eval_memory.py
	$(PY) bench/train_step.py

clean:
	rm -rf $(VENV) build *.egg-info
