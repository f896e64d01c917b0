# make demo : prepare the offline demo corpus, train the demo model on CPU, evaluate it.
# make test : lint (ruff, the layout rules of .ci/layout.py, shellcheck), then every test (unit + integration: DeepSpeed launches, moto S3, mlflow server, Slurm).
# make lock : rewrite constraints.txt from the installed environment (after a dependency change, once tested).
# Each target creates .venv and installs what it needs on first use, at the versions in constraints.txt.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test unit lint lock install clean

install: $(STAMP)

# constraints.txt pins every package to the versions the tests passed with: installs are reproducible and
# the resolver has nothing to search (open ranges can be unresolvable for an older pip).
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt --upgrade pip
	# the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q -c constraints.txt "torch==2.13.0"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

lock:
	# local version labels (torch 2.13.0+cpu) dropped: "torch==2.13.0" accepts the CPU and the CUDA build
	$(PY) -m pip freeze --all --exclude-editable | sed -E 's/^([A-Za-z0-9_.-]+==[^+]+)\+.*/\1/' > constraints.txt

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) .ci/layout.py  # no import circle, the library never imports launchers/, functions <= 60 lines, files <= 400
	shellcheck slurm/*.sh

# the demo: shards of the Python reference manual (offline), a few minutes of CPU training, test-split score
demo: $(STAMP)
	$(PY) -m data_pipelines.demo_corpus --out data/demo
	$(PY) hgscale/train.py --config configs/demo.json
	$(PY) -m hgscale evaluate --checkpoint runs/demo/checkpoints --split test

# pytest exits 5 when it collects nothing: report it, do not fail on it
test: lint
	$(PY) -m pytest tests $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs data/demo .pytest_cache
