# One entry point for people and CI. `make test` is the command the README and .ci/run both use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-deps test demo replay bench bench-daemon bench-detection soak lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV) || { echo "creating .venv failed: on Debian/Ubuntu, apt-get install python3-venv"; exit 1; }
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# numba's cache keys a compiled kernel on its own source file only, and the sweep kernels inline code from the
# other kernel modules (bellman takes transport's simplex): after an edit to one of them the others' cached
# machine code would keep running the old version. Any change under dtsync/metric/ drops every cached kernel.
KERNELS := $(VENV)/.kernels
$(KERNELS): $(wildcard dtsync/metric/*.py) | $(STAMP)
	find dtsync \( -name '*.nbi' -o -name '*.nbc' \) -delete
	touch $@

# Debian packages the tests drive for real (mosquitto, prometheus, systemd-analyze); installs what is missing.
system-deps:
	.ci/system-deps

test: system-deps $(STAMP) $(KERNELS)
	$(BIN)/ruff check dtsync tests benchmarks deploy
	$(BIN)/mypy
	$(BIN)/pytest -q

# The main job: a broker (mosquitto if installed, else embedded), the testbed as a real network and two
# twins, the real daemon, and a live view, for a minute.
demo: $(STAMP) $(KERNELS)
	$(BIN)/dtsync demo

# Offline: replay a generated sample trace (a real network and two twins, one drifting).
replay: $(STAMP) $(KERNELS)
	$(BIN)/dtsync sample --out samples
	$(BIN)/dtsync replay --real samples/real.jsonl --twin faithful=samples/faithful.jsonl \
		--twin drifting=samples/drifting.jsonl --config config.yaml --timeline samples/timeline.jsonl

bench: $(STAMP) $(KERNELS)
	$(BIN)/python benchmarks/bench_engine.py

bench-daemon: $(STAMP) $(KERNELS)
	$(BIN)/python benchmarks/bench_daemon.py

# Ten minutes of 5,000 transitions/s with a broker restart every 20 s: RSS, descriptors, events raised vs
# delivered (`make soak SOAK_SECONDS=60` for the short version; the suite runs 30-50 s versions of both soaks).
soak: system-deps $(STAMP) $(KERNELS)
	$(BIN)/python benchmarks/soak.py --seconds $${SOAK_SECONDS:-600} --check

# False alarms, detection delays, interval coverage and p-values on streams with known truth, against River's
# detectors (installed here as the optional `bench` extra).
bench-detection: $(STAMP) $(KERNELS)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/bench_detection.py

clean:
	rm -rf $(VENV) samples .pytest_cache
