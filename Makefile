# One-command setup: `make run` and `make test` create .venv on first use.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TINY := .cache/tiny-v3

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

# the demo on 2 data-parallel ranks with expert parallelism (torchrun, gloo on CPU)
run: $(TINY)/config.json
	OMP_NUM_THREADS=1 $(VPY) -m torch.distributed.run --nproc-per-node 2 --master-port 29511 \
		-m launch.demo --model $(TINY)

test: $(STAMP)
	$(VPY) -m pytest -q tests

# ruff (pinned in requirements.txt), 110 columns (pyproject.toml); not yet part of `make test`
lint: $(STAMP)
	$(VENV)/bin/ruff check engine scheduler model kernels launch

clean:
	rm -rf $(VENV) .cache
