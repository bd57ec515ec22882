//go:build gpu

package test

// On CUDA hosts (go test -tags gpu, run by scripts/gpu-check) the suite runs on the GPU; float32
// keeps the greedy comparisons with model.generate exact (bf16 ties flip with batch shapes).
var device, dtype = "cuda", "float32"
