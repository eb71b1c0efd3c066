# vmhop build, test and lab targets. Everything that needs root says so.
SHELL := /bin/bash
GO ?= go
CLANG ?= clang
# The guest image is cached outside the repository.
GUEST_DIR ?= /var/cache/vmhop/guest
export VMHOP_GUEST_DIR := $(GUEST_DIR)
# Lab tests are timing-sensitive (the WAN emulator is a userspace process on
# a 2-core machine): run test binaries one at a time.
TEST_FLAGS ?= -count=1 -p 1 -timeout 25m
TEST_LOG ?= test.log

GUEST_SRC := $(wildcard internal/guest/*.go internal/guest/image/*) cmd/vmhop-guest/main.go

.PHONY: all build test unit lint generate guest demo demo-down fuzz bench bench-datapath soak deb clean

all: build

# vmhopd reports it in hello and status; peers compare protocol versions, not this.
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/vmhop/vmhop/daemon.Version=$(VERSION)

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/vmhop ./cmd/vmhop
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/vmhopd ./cmd/vmhopd
	$(GO) build -o bin/vmhop-lab ./cmd/vmhop-lab

# The Debian package (dist/vmhop_VERSION_amd64.deb): binaries, unit, example
# configs, docs; built by nfpm (packaging/nfpm.yaml), run from the Go module
# proxy like any Go tool. Install: apt install ./dist/vmhop_*.deb
NFPM ?= github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.45.2
DEB_VERSION ?= 0.1.0~git$(shell git log -1 --format=%cd.%h --date=format:%Y%m%d 2>/dev/null || echo 0)
DIST ?= dist
deb: build
	mkdir -p $(DIST)
	VMHOP_BIN=bin VMHOP_DEB_VERSION=$(DEB_VERSION) $(GO) run $(NFPM) package -f packaging/nfpm.yaml -p deb -t $(DIST)/

# Every test, lab tests included (they need root: as non-root they skip,
# saying so). Prints a closing "N passed, N failed, N skipped" line (top-level
# tests passed or failed; skips counted at every level, subtests too).
test: guest
	@set -o pipefail; rc=0; \
	$(GO) test $(TEST_FLAGS) -v ./... 2>&1 | tee $(TEST_LOG) | grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic)' | grep -v '^=== RUN' || rc=$$?; \
	p=$$(grep -c '^--- PASS' $(TEST_LOG)); f=$$(grep -c '^--- FAIL' $(TEST_LOG)); s=$$(grep -cE '^ *--- SKIP' $(TEST_LOG)); \
	if grep -qE '^(FAIL|panic:)' $(TEST_LOG); then rc=1; fi; \
	echo "tests: $$p passed, $$f failed, $$s skipped"; exit $$rc

# Unit tests only: no root, no lab.
unit:
	$(GO) test -count=1 -short ./...

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

# Rebuild the generated BPF objects and Go bindings (needs clang, libbpf-dev).
# Debian's clang needs the multiarch include dir for asm/types.h.
BPF_CFLAGS ?= -O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu
generate:
	BPF_CLANG=$(CLANG) BPF_CFLAGS="$(BPF_CFLAGS)" $(GO) generate ./bpf/...

# The lab guest: Debian cloud kernel + busybox initramfs with vmhop-guest.
guest: $(GUEST_DIR)/initrd.img
$(GUEST_DIR)/initrd.img: $(GUEST_SRC) go.mod
	internal/guest/image/build.sh $(GUEST_DIR)

# The main job in the lab (root): build the lab, boot the guest at site A,
# migrate it to site B while a client probes it, print the disruption report.
demo: build guest
	bin/vmhop-lab up --name demo
	bin/vmhop-lab vm start --name demo
	bin/vmhop-lab migrate -f configs/lab-migration.yaml --name demo
	bin/vmhop-lab status

demo-down:
	bin/vmhop-lab down --name demo

# Disruption benchmark (root, ~47 min with the defaults): control (no move,
# the guest's own floor, 100 s), freeze-and-copy,
# live migration with DNS only, vmhop (eBPF redirect), vmhop (userspace
# fallback), the live modes through a vmhopd per site, each BENCH_REPEATS
# times under the same load, decomposed from
# a packet capture at the client; results, tables and plots in
# bench/results/<date>-<scenario>/. BENCH_FLAGS adds -disk, -fill, -modes,
# -scale, ... (go run ./bench/disruption -h).
BENCH_REPEATS ?= 3
BENCH_FLAGS ?=
bench: guest
	mkdir -p bench/results
	$(GO) run ./bench/disruption -repeats $(BENCH_REPEATS) -out bench/results $(BENCH_FLAGS)

# Datapath throughput (root, ~1 min): iperf3 over plain routing, the eBPF
# redirect, the new address (NAT) and the userspace fallback, in one run.
bench-datapath:
	mkdir -p bench/results
	$(GO) run ./bench/datapath -out bench/results/datapath.txt

# Soak (root, ~20 min): 20 lab migrations back to back under the main job's
# load, the guest's RAM and disk verifiers on; fails unless every one is
# correct (exit 0, same boot, nothing lost). SOAK_FLAGS adds -runs, -downtime,
# -auto-converge, -exact-ram.
SOAK_FLAGS ?=
soak: guest
	mkdir -p bench/results
	$(GO) run ./bench/soak -out bench/results/soak $(SOAK_FLAGS)

fuzz:
	$(GO) test ./internal/config/ -run '^$$' -fuzz FuzzParse -fuzztime 30s -fuzzminimizetime 5s
	$(GO) test ./proxy/ddns/ -run '^$$' -fuzz FuzzParseKey -fuzztime 30s -fuzzminimizetime 5s

clean:
	rm -rf bin $(DIST) $(TEST_LOG)
