# One-command setup: `make run` and `make test` create .venv on first use.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TINY := .cache/tiny-v3
LINT_DIRS := engine scheduler model kernels launch bench tests
# the committed small DeepSeek-V3 trained on the Python language reference (launch/train_tiny.py)
MODEL ?= checkpoints/tiny-v3-trained

.PHONY: run test lint install clean demo-ckpt

$(STAMP): requirements.txt pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first and pinned, so nothing later resolves it to a CUDA build
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

$(TINY)/config.json: $(STAMP)
	$(VPY) -m launch.make_checkpoint $(TINY) --preset tiny-v3

# the demo on 2 data-parallel ranks with expert parallelism (torchrun, gloo on CPU), greedy text
# checked against transformers'; `make run MODEL=.cache/tiny-v3` runs it on random weights (tiny-v3 preset)
run: $(STAMP) $(if $(filter $(TINY),$(MODEL)),$(TINY)/config.json)
	OMP_NUM_THREADS=1 $(VPY) -m torch.distributed.run --nproc-per-node 2 --master-port 29511 \
		-m launch.demo --model $(MODEL) --check

# lint first (a ruff error fails the target before any test runs), then the whole suite
test: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_DIRS)
	$(VPY) -m pytest -q tests

# ruff (pinned in requirements.txt), 110 columns (pyproject.toml); `make test` runs it too
lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_DIRS)

clean:
	rm -rf $(VENV) .cache
