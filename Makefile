# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo serve loop test bench mlflow redis clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	# torch first, pinned: on CPU machines this is the CPU build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) jobs/demo.py --config configs/demo.yaml

# The demo models (make demo registers the retrieval model demo-hstu and the GR ranker demo-gr) over HTTP on
# 127.0.0.1:8000 until Ctrl-C: the page at /, the API at /docs.
# Writes (/v1/events, clicks on the page) need GENREC_SERVE_TOKEN set (16+ characters).
serve: install
	$(PY) jobs/serve.py --config configs/serve/demo.yaml --set ranker.uri=models:/demo-gr/latest

# The loop on the demo model (after make demo): serve it behind @production, post events on items it has never
# had, refresh it (jobs/refresh.py), watch the app roll the new version out and retrieve the new items.
loop: install
	$(PY) jobs/loop_demo.py --config configs/refresh-demo.yaml

test: install
	$(PY) -m pytest tests

bench: install
	$(PY) benchmarks/data_pipeline.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/attention.py
	$(PY) benchmarks/mfalcon.py
	$(PY) benchmarks/retrieval_ann.py
	$(PY) benchmarks/embedding_scale.py
	# 1M and 10M events prepared (vs polars' streaming engine), trained and served; --full is 10M and 100M (long)
	$(PY) benchmarks/large_log.py
	# refresh rounds on a world where items enter: refreshed vs frozen vs retrained, HSTU and SASRec, 3 seeds (~30 min)
	$(PY) benchmarks/refresh_rounds.py --models hstu sasrec --seeds 1 2 3
	# the Serve app on the demo model (`make demo` registers it) under a bounded load, then a replica killed
	$(PY) benchmarks/serve_load.py --requests 1000 --concurrency 32

# A shared MLflow tracking server. Jobs use it with MLFLOW_TRACKING_URI=http://$(MLFLOW_HOST):$(MLFLOW_PORT)
# (or tracking.tracking_uri). Defaults: a sqlite database and an artifact folder under outputs/mlflow-server,
# bound to 127.0.0.1. A PostgreSQL database instead: MLFLOW_BACKEND=postgresql://user:password@host:5432/mlflow
# (pip install psycopg2-binary). Artifacts in object storage (no shared disk): MLFLOW_ARTIFACTS=s3://bucket/mlflow,
# with the AWS credentials in this server's environment only (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile
# or the instance role; AWS_ENDPOINT_URL for an S3-compatible store). Clients upload through the server; they
# download through presigned URLs straight from the store (no credentials, but a network route to it), or
# through the server with MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false. MLFLOW_HOST=<private IP> lets cluster
# nodes reach it. MLflow's job runner (GenAI scoring, seven more processes) is off: genrec needs only tracking,
# the registry and the artifacts (MLFLOW_JOBS=true turns it on).
MLFLOW_HOST      ?= 127.0.0.1
MLFLOW_PORT      ?= 5000
MLFLOW_DIR       ?= $(CURDIR)/outputs/mlflow-server
MLFLOW_BACKEND   ?= sqlite:///$(MLFLOW_DIR)/mlflow.db
MLFLOW_ARTIFACTS ?= $(MLFLOW_DIR)/artifacts
MLFLOW_WORKERS   ?= 2
MLFLOW_JOBS      ?= false

mlflow: export MLFLOW_SERVER_ENABLE_JOB_EXECUTION = $(MLFLOW_JOBS)
mlflow: install
	mkdir -p $(MLFLOW_DIR)
	$(VENV)/bin/mlflow server --backend-store-uri $(MLFLOW_BACKEND) --artifacts-destination $(MLFLOW_ARTIFACTS) \
		--serve-artifacts --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers $(MLFLOW_WORKERS)

# A local Redis for the shared history store (store.kind: redis) until Ctrl-C: Debian's redis-server
# (apt-get install redis-server), bound to 127.0.0.1, data under outputs/redis. Durable: the append-only file
# is fsynced before every answer (--appendonly yes --appendfsync always), so no acknowledged event is lost;
# RDB snapshots off (the AOF is the data). Serve with it: jobs/serve.py --config configs/serve/demo.yaml
# --set store.kind=redis (store.redis_url: redis://127.0.0.1:$(REDIS_PORT)/0).
# REDIS_HOST=<private IP> lets a cluster's Serve replicas reach it (never 0.0.0.0).
REDIS_HOST ?= 127.0.0.1
REDIS_PORT ?= 6379
REDIS_DIR  ?= $(CURDIR)/outputs/redis

redis:
	@command -v redis-server >/dev/null || { echo "make redis needs Debian's redis-server: sudo apt-get install redis-server"; exit 1; }
	mkdir -p $(REDIS_DIR)
	redis-server --bind $(REDIS_HOST) --port $(REDIS_PORT) --dir $(REDIS_DIR) --appendonly yes --appendfsync always --save ''

clean:
	rm -rf outputs .pytest_cache
