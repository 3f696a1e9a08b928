# The two commands of the README: `make up` runs the hub, `make test` runs every test.
# Both install what a fresh machine lacks first (scripts/setup.sh).
CARGO ?= cargo
export CARGO_TARGET_DIR ?= $(CURDIR)/target

.PHONY: setup up build test test-setup test-layering test-rust test-e2e test-fuzz bench

setup:
	./scripts/setup.sh

build: setup
	$(CARGO) build --release --bin roost

up: build
	$(CARGO_TARGET_DIR)/release/roost up

# One build of everything the tests need, resolved as `cargo test --workspace` resolves it (with
# dev-dependencies): building the binaries alone resolves the build scripts' dependencies
# differently and compiles RocksDB's C++ a second time.
test: setup test-setup test-layering
	$(CARGO) build --workspace --all-targets
	$(CARGO) test --workspace
	ROOST_BIN=$(CARGO_TARGET_DIR)/debug/roost .venv/bin/python -m pytest tests/e2e -q
	./scripts/fuzz_smoke.sh

# Every fuzz target for a few seconds from its seed corpus (FUZZ_SECS=N for longer).
test-fuzz:
	./scripts/fuzz_smoke.sh

# The set-up's detection on simulated fresh machines (private mount namespaces; user namespaces when not root).
test-setup:
	./scripts/test_setup.sh

# DESIGN.md §3's layering, on the real dependency graph.
test-layering:
	./scripts/check_layering.sh

test-rust:
	$(CARGO) test --workspace

test-e2e:
	$(CARGO) build --workspace --all-targets
	ROOST_BIN=$(CARGO_TARGET_DIR)/debug/roost .venv/bin/python -m pytest tests/e2e -q
