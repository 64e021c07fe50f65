# vllm_overlay: attention + FP8 output-quant fusion for vLLM 0.8.5.post1.
#   make demo   build the embedded tiny FP8 model, compile it, print the fusion report
#   make test   the CPU test suite (sets up .venv first)
PYTHON_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: setup test demo patches clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q pip==24.3.1 setuptools==65.5.0 wheel==0.45.1
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

demo: setup
	$(PY) -m vllm_overlay report

# triton 3.2.0 (vLLM 0.8.5 users' triton) packed for the GPU box: .gpu_bundle/triton-3.2.0.tar.xz
triton-bundle:
	$(PYTHON_SYS) gpu_harness/triton_bundle.py build

# vLLM 0.8.5.post1's Python files + cp$(BOX_PYTHON) wheels for the GPU box: .gpu_bundle/vllm085/
BOX_PYTHON ?= 3.12
gpu-bundle: setup
	$(PYTHON_SYS) gpu_harness/vllm_bundle.py build --python-version $(BOX_PYTHON)

patches: setup
	$(PY) tools/make_patches.py

clean:
	rm -rf $(VENV) build out
