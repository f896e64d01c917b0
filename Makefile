# make demo : prepare the offline demo corpus, train the demo model on CPU, evaluate it.
# make test : every test (unit + integration: DeepSpeed launches, moto S3, mlflow server, Slurm).
# Each target creates .venv and installs what it needs on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test unit install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q "torch==2.13.0"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# the demo: shards of the Python reference manual (offline), a few minutes of CPU training, test-split score
demo: $(STAMP)
	$(PY) -m data_pipelines.demo_corpus --out data/demo
	$(PY) hgscale/train.py --config configs/demo.json
	$(PY) -m hgscale.evaluate --checkpoint runs/demo/checkpoints --split test

# pytest exits 5 when it collects nothing: report it, do not fail on it
test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs data/demo .pytest_cache
