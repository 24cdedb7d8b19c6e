# wgmesh: thin wrapper around cargo and the test tiers. `make help` lists the targets.
# Targets marked (root) create network namespaces, mounts and TUN devices; run them as root.

SHELL := /bin/bash
CARGO ?= cargo
PROFILE_DIR := target/debug
export WGMESH_AGENT_BIN := $(CURDIR)/$(PROFILE_DIR)/wgmesh-agent
export WGMESH_APISERVER_BIN := $(CURDIR)/$(PROFILE_DIR)/wgmesh-apiserver
export WGMESH_PROBE_BIN := $(CURDIR)/$(PROFILE_DIR)/wgmesh-probe
export WGMESHCTL_BIN := $(CURDIR)/$(PROFILE_DIR)/wgmeshctl
export PATH := $(HOME)/.cargo/bin:$(PATH)
# Parallel netns scenarios: each one builds its own small cluster.
NETNS_THREADS ?= 2

.PHONY: help bootstrap build demo test test-unit test-netns test-kernel bench lint fmt clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

bootstrap: ## install what a fresh machine lacks (Debian packages, nightly rust-src, bpf-linker); idempotent
	@bash .ci/bootstrap

build: bootstrap ## build the agent (with its embedded eBPF), wgmeshctl, the API stand-in and test tools
	$(CARGO) build --bins

demo: build ## (root) simulate a 3-node cluster in network namespaces and prove pod traffic is encrypted
	$(PROFILE_DIR)/wgmesh-demo

test: build ## (root) every test this machine can run: unit, netns scenarios, kernel VM tier
	$(MAKE) --no-print-directory test-unit
	$(MAKE) --no-print-directory test-netns
	$(MAKE) --no-print-directory test-kernel

test-unit: ## unit, table and mock tests (no privileges needed)
	$(CARGO) test --workspace --exclude wgmesh-ebpf

test-netns: build ## (root) scenarios on simulated nodes: real agents, API stand-in, userspace WireGuard
	$(CARGO) test -p wgmesh-netns-tests -p wgmesh-datapath -p wgmesh-device -- --ignored --test-threads=$(NETNS_THREADS)

test-kernel: build ## (root) kernel WireGuard scenarios inside a qemu VM booting Debian's stable kernel
	bash netns-tests/vm/setup
	bash netns-tests/vm/selftest
	bash netns-tests/vm/scenarios

bench: build ## (root) datapath, control-plane and disruption benchmarks -> bench/RESULTS.md
	$(CARGO) build --release --bins
	bash bench/run

lint: ## rustfmt and clippy
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --exclude wgmesh-ebpf --all-targets -- -D warnings

fmt: ## format the code
	$(CARGO) fmt --all

clean: ## remove build output
	$(CARGO) clean
