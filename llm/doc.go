// Package llm is govllm's contract: the types a caller exchanges with an inference engine
// (requests, sampling parameters, deltas, usage, model information, errors) and the small
// interfaces that the HTTP server needs ([Generator], [TokenStream]).
//
// It is pure Go with no cgo, no purego and no embedded files, so the HTTP layer, the benchmark
// client and any library user can build, vet and test against it without a C toolchain or a
// Python interpreter. The runtime that implements it (an embedded CPython running vLLM or
// transformers) lives in package engine.
package llm
