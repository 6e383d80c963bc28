# The two commands a new user runs: `make run` and `make test`. Both make sure the machine has
# Postgres server binaries first (installing Debian's package when it can), unless a database
# URL names the server to use: DATABASE_URL for run, TEST_DATABASE_URL or DATABASE_URL for test.
SHELL := /bin/bash
GO ?= go
BIN := bin
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/claudemesh/broker/broker.Version=$(VERSION)
# The suite runs package binaries in parallel; each one fits well inside this.
TEST_TIMEOUT ?= 12m
# Fuzz budgets are execution counts, not durations: a duration-based -fuzztime can fail with a
# bare "context deadline exceeded" and no failing input (a race in Go 1.26's fuzz coordinator,
# golang/go#75804). Targets that go through the database run far fewer executions per second.
FUZZTIME ?= 200000x
FUZZTIME_SLOW ?= 100x
FUZZ_SLOW := FuzzJoinBody

.PHONY: run test check generate build ensure-postgres fuzz lint clean

ensure-postgres:
	@scripts/ensure-postgres

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/broker ./cmd/broker
	@if [ -d cmd/meshctl ]; then $(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/meshctl ./cmd/meshctl; fi

# Runs one replica on the embedded Postgres (./.broker-data) unless DATABASE_URL is set.
run: $(if $(DATABASE_URL),,ensure-postgres) build
	$(BIN)/broker serve

# With a database URL set, the tests of the embedded Postgres skip when the binaries are missing.
test: $(if $(TEST_DATABASE_URL)$(DATABASE_URL),,ensure-postgres)
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) ./...

# Short fuzz runs of every decoder and body parser (CI runs these too).
fuzz:
	@set -e; for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg 2>/dev/null | grep '^Fuzz' || true); do \
	    budget=$(FUZZTIME); case " $(FUZZ_SLOW) " in *" $$f "*) budget=$(FUZZTIME_SLOW);; esac; \
	    echo "fuzz $$pkg $$f ($$budget)"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $$budget $$pkg; \
	  done; \
	done

generate:
	$(GO) tool sqlc generate

# Fails when the tree is not formatted, vetted, staticcheck-clean, or sqlc output is stale.
check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) tool staticcheck ./...
	$(GO) tool sqlc diff
	$(GO) tool sqlc vet
	@echo "check: ok"

clean:
	rm -rf $(BIN)
