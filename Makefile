# govllm: `make run` serves the default model; `make test` runs every test. Both bootstrap first.
SHELL := /bin/bash
PY := .venv/bin/python
SHIM := engine/shim/libgovllm_shim.so
GO_TEST_FLAGS ?= -race -count=1 -timeout 30m
export CGO_ENABLED := 1
# go-nvml's cgo wrappers call NVML functions the header marks deprecated: 29 warnings per
# fresh build that say nothing about this project.
export CGO_CFLAGS ?= -O2 -g -Wno-deprecated-declarations

.PHONY: all bootstrap shim build run test check-deps test-go test-python test-e2e fuzz gpu-bundle bench clean

all: build

bootstrap:
	@scripts/bootstrap

# The shim is compiled against any Python >= 3.10 headers with the limited API and does not link
# libpython, so one build serves every interpreter.
$(SHIM): cshim/shim.c cshim/shim.h
	@mkdir -p $(dir $@)
	@py=python3; [ -x $(PY) ] && py=$(PY); \
	  inc=$$($$py -c 'import sysconfig; print(sysconfig.get_path("include"))'); \
	  gcc -O2 -g -Wall -Wextra -Wno-deprecated-declarations -Wno-missing-field-initializers -fPIC -fno-plt -shared \
	    -I"$$inc" -o $@ cshim/shim.c -lpthread
	@echo "built $@"

shim: $(SHIM)

build: $(SHIM)
	go build -o bin/govllm ./cmd/govllm

run: bootstrap build
	bin/govllm serve

test: bootstrap build check-deps
	go vet ./...
	go vet -tags gpu ./...
	$(MAKE) test-go test-python

# The contract and the HTTP layer build without cgo, purego or the embedded shim.
check-deps:
	CGO_ENABLED=0 go vet ./llm/ ./server/ ./bench/ ./registry/ ./detok/ ./tokenize/
	@if go list -deps ./server/ ./llm/ | grep -E 'purego|govllm/engine$$'; then \
	  echo "check-deps: server or llm depends on the runtime" >&2; exit 1; fi
	@echo "check-deps: llm, server, bench, registry, detok and tokenize build without cgo; server links no purego"

test-go: $(SHIM)
	go test $(GO_TEST_FLAGS) ./...
	$(MAKE) fuzz

# Bounded fuzzing of the request decoders (go test takes one -fuzz target per run). Minimizing
# each new input may take 60 s by default, which would spend the whole budget on one input.
FUZZTIME ?= 20s
fuzz:
	go test -run '^$$' -fuzz '^FuzzDecodeChat$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 1s ./server/
	go test -run '^$$' -fuzz '^FuzzDecodeCompletion$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 1s ./server/
	go test -run '^$$' -fuzz '^FuzzEncode$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 1s ./tokenize/

test-python:
	$(PY) -m pytest -q engine/python/tests

# Test binaries of every package with `-tags gpu` tests and the server, stripped and packed into
# build/gpu-bundle.tar.xz, for scripts/gpu-check on CUDA hosts without Go (carry that one file).
gpu-bundle: build
	@rm -rf build/gpu && mkdir -p build/gpu
	@for d in $$(grep -rl --include='*_test.go' '^//go:build gpu' . | grep -v '^./.venv' | xargs -n1 dirname | sort -u); do \
	  name=$$(echo $${d#./} | tr / -); \
	  go test -c -tags gpu -ldflags='-s -w' -o build/gpu/$$name.test $$d && echo $${d#./} > build/gpu/$$name.pkg && echo "built build/gpu/$$name.test"; \
	done
	@go build -ldflags='-s -w' -o build/gpu/govllm ./cmd/govllm
	@mkdir -p build/gpu/models && cp -r models/tiny-llama-dummy build/gpu/models/
	@tar -C build -cJf build/gpu-bundle.tar.xz gpu && ls -l build/gpu-bundle.tar.xz

bench: $(SHIM)
	go test -run '^$$' -bench . -benchtime 9x ./engine/

clean:
	rm -rf bin build engine/shim
