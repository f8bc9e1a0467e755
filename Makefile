# Set-up and test commands. `make test` on a fresh clone installs everything it needs.
SHELL := /bin/bash
PY_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install system-deps test test-unit lint run serve deploy clean-venv

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

install: $(STAMP)

# torch + torchvision first (pinned; torchvision for transformers' InternVL processor), then everything else in ONE pip command so the resolver sees
# every pin at once (installing moto after s3fs separately breaks aiobotocore's botocore pin).
# DeepSpeed is an sdist: it builds against the installed torch (no build isolation), with its CPU
# shared-memory all-reduce op compiled now so no run JIT-compiles it (~35 s on 2 cores). --no-cache-dir:
# pip's wheel cache keys a wheel built from an sdist by the sdist alone, so a DeepSpeed built against an
# earlier torch would be reused and refuse to run ("PyTorch version mismatch").
$(STAMP): pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q ninja
	DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_ACCELERATOR=cpu \
	  $(PIP) install -q --no-build-isolation --no-cache-dir -e '.[dev]'
	$(PY) -c "import deepspeed.ops.comm.deepspeed_shm_comm_op" 2>/dev/null \
	  || $(PY) -c "from deepspeed.ops.op_builder import ShareMemCommBuilder as B; B().load(); print('shm op JIT-built')"
	touch $(STAMP)

# System commands the multi-node tests and launchers run: sshd + pdsh (train.hostfile: DeepSpeed's runner starts
# every node over SSH) and Slurm + munge (train.launcher=slurm). As root, what is missing is installed with
# apt-get; otherwise the command to run is printed, and the tests that need them fail saying what is missing.
SYSTEM_CMDS := sshd:openssh-server pdsh:pdsh srun:slurm-wlm munge:munge
system-deps:
	@missing=""; for pair in $(SYSTEM_CMDS); do cmd=$${pair%%:*}; pkg=$${pair#*:}; \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v $$cmd >/dev/null || missing="$$missing $$pkg"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null \
	  || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null; }; \
	else echo "missing system packages:$$missing; install them as root: apt-get install$$missing" \
	  "(the multi-node tests fail without them)"; fi

lint: install
	$(VENV)/bin/ruff check .

test: install system-deps lint
	$(VENV)/bin/pytest -q

# The fast inner loop: every test that starts no server and no other process (under a minute on 2 cores).
test-unit: install
	$(VENV)/bin/pytest -q -m "not integration"

# The whole pipeline on the bundled demo: generated data, tiny model, 2 training processes, local
# storage, an ephemeral Prefect server. Outputs go to runs/demo/.
run: install
	$(VENV)/bin/vlmft demo-data runs/demo/data
	$(VENV)/bin/vlmft run --config configs/demo.yaml

# A local Prefect server (SQLite, UI on http://127.0.0.1:4200) and a process worker; Ctrl-C stops both.
serve: install
	$(PY) -m deployments.serve

# Register the deployments (finetune, retrain-nightly, merge) on the server of `make serve`.
deploy: install
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:4200/api} $(VENV)/bin/vlmft deploy --config deployments/finetune.yaml

clean-venv:
	rm -rf $(VENV)
