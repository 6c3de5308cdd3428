# The two commands of the README: `make demo` and `make test`. Everything runs from the repository root.
PY ?= python3
DEMO ?= demo
# Requirements are declared once, in setup.cfg; these read them from there.
REQS = $(PY) -c 'import configparser as c; p = c.ConfigParser(); p.read("setup.cfg"); print(p["options"]["install_requires"])'
TEST_REQS = $(PY) -c 'import configparser as c; p = c.ConfigParser(); p.read("setup.cfg"); print(p["options.extras_require"]["test"])'

.PHONY: deps test-deps demo test bench gpu-wheels clean

# torch first and pinned: a bare `torch` requirement can pull a multi-GB CUDA build where a CPU one would do.
deps:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -m pip install -q $$($(REQS))

test-deps: deps
	@$(PY) -m pip install -q $$($(TEST_REQS))

$(DEMO)/images/.done: preprocess/make_demo.py
	rm -rf $(DEMO)/images
	$(PY) -m preprocess.make_demo $(DEMO)/images
	touch $@

demo: deps $(DEMO)/images/.done
	$(PY) -m preprocess.build_lmdb $(DEMO)/images/train $(DEMO)/train --size 80 --overwrite
	$(PY) -m preprocess.build_lmdb $(DEMO)/images/val $(DEMO)/val --size 80 --classes-from $(DEMO)/train --overwrite
	$(PY) -m preprocess.verify $(DEMO)/train --quiet
	$(PY) -m preprocess.verify $(DEMO)/val --quiet
	$(PY) train.py configs/demo.yaml data.train=$(DEMO)/train data.val=$(DEMO)/val
	$(PY) evaluate.py --config configs/demo.yaml --data $(DEMO)/val --tencrop

test: test-deps
	$(PY) -m pytest

# Figures for docs/BENCHMARKS.md (several minutes; each bench compares against its baseline in one run).
bench: deps
	$(PY) -m bench.build
	$(PY) -m bench.loader
	$(PY) -m bench.model
	$(PY) -m bench.train_step
	$(PY) -m bench.evaluate
	$(PY) -m bench.preemption

# What a bare GPU node may lack (its torch stays its own): wheels for CPython 3.11, 3.12 and 3.13 in the
# git-ignored .wheels/, which travels with the check; bench.gpu_check installs from it only what does not import
# (docs/BENCHMARKS.md, "GPU checks").
GPU_WHEELS = lmdb zlib-ng msgpack
gpu-wheels:
	@for v in 3.11 3.12 3.13; do \
		$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $$v --implementation cp \
			--platform manylinux2014_x86_64 -d .wheels $(GPU_WHEELS) || exit 1; \
	done
	@du -sh .wheels && ls .wheels

clean:
	rm -rf $(DEMO) .pytest_cache
