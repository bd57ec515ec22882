//go:build gpu

package vllm_test

// On CUDA hosts (go test -tags gpu, run by scripts/gpu-check) the same suite runs on the GPU,
// with the interpreter named by GOVLLM_PYTHON.
func init() { deviceArgs = []string{"--device", "cuda", "--engine", "vllm", "--dtype", "float32"} }
