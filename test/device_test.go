//go:build !gpu

package test

// device and dtype of the in-process engine and of the reference runs; gpu_test.go sets CUDA.
var device, dtype = "cpu", "float32"
