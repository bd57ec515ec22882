package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"strings"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/gpu"
	"github.com/govllm/govllm/gpu/gputest"
	"github.com/govllm/govllm/internal/pyfind"
	"github.com/govllm/govllm/launch"
)

// withGPUs points openGPUs at a fake host, and findPython at an interpreter that can import
// vLLM, for one test (not parallel: the seams are globals).
func withGPUs(t *testing.T, lib nvml.Interface) {
	t.Helper()
	oldGPUs, oldPython := openGPUs, findPython
	openGPUs = func(log *slog.Logger) (*gpu.Host, error) { return gpu.Open(gpu.Config{Lib: lib, Logger: log}) }
	findPython = func(context.Context, string, string) (*pyfind.PythonInfo, error) {
		return &pyfind.PythonInfo{Executable: "/venv/bin/python", Version: "3.11.7", Missing: map[string]string{}}, nil
	}
	t.Cleanup(func() { openGPUs, findPython = oldGPUs, oldPython })
}

// noDriver is an NVML whose library is missing.
type noDriver struct{ nvml.Interface }

func (noDriver) Init() nvml.Return { return nvml.ERROR_LIBRARY_NOT_FOUND }

func eightGPUs(t *testing.T) *gputest.Box {
	t.Helper()
	b, err := gputest.EightGPUs()
	require.NoError(t, err)
	return b
}

func runGPUs(args ...string) (stdout, stderr string, code int) {
	var out, errw bytes.Buffer
	code = run(append([]string{"gpus"}, args...), &out, &errw)
	return out.String(), errw.String(), code
}

func TestGPUsCommandNoDriver(t *testing.T) {
	withGPUs(t, noDriver{})
	out, errOut, code := runGPUs()
	require.Equal(t, 0, code, errOut)
	require.Equal(t, "no NVIDIA driver found; running on CPU\n\n"+
		"plan: engine=vllm device=cpu dtype=float32\n"+
		"  python: /venv/bin/python (3.11.7)\n"+
		"  engine auto: vllm (the interpreter can import vllm)\n"+
		"  device cpu: no NVIDIA driver found; running on CPU\n"+
		"  dtype float32: auto on CPU (bfloat16 there changes greedy answers and makes them depend on batch composition)\n", out)

	out, _, code = runGPUs("--json")
	require.Equal(t, 0, code)
	var rep gpusReport
	require.NoError(t, json.Unmarshal([]byte(out), &rep))
	require.True(t, rep.CPU)
	require.Equal(t, "no NVIDIA driver found; running on CPU", rep.Message)
	require.Empty(t, rep.Devices)
	require.Equal(t, "vllm", rep.Plan.Engine)
	require.Equal(t, "cpu", rep.Plan.Device)
	require.Nil(t, rep.Plan.Placement)

	_, errOut, code = runGPUs("--gpus", "0")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "--gpus 0: gpu: no NVIDIA driver found")
}

// TestGPUsCommandThisHost runs the real NVML and the real interpreter search: on a host without
// the driver it says so and plans for CPU.
func TestGPUsCommandThisHost(t *testing.T) {
	out, errOut, code := runGPUs()
	if _, err := gpu.Open(gpu.Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}); err == nil {
		t.Skip("this host has NVIDIA GPUs")
	}
	require.True(t, strings.HasPrefix(out, "no NVIDIA driver found; running on CPU\n"), out)
	if code == 0 {
		require.Contains(t, out, " device=cpu dtype=float32")
	} else {
		require.Contains(t, errOut, "no usable python", "only a missing interpreter may fail the plan")
	}
}

func TestGPUsCommandTable(t *testing.T) {
	withGPUs(t, eightGPUs(t).Lib)
	out, errOut, code := runGPUs("--tensor-parallel-size", "2", "--model", gputest.Checkpoint(t))
	require.Equal(t, 0, code, errOut)
	lines := strings.Split(out, "\n")
	require.Regexp(t, `^GPU\s+NAME\s+UUID\s+MEMORY USED/TOTAL\s+FREE\s+UTIL\s+TEMP\s+POWER\s+PCI BUS ID\s+NUMA\s+NVLINK$`, lines[0])
	require.Regexp(t, `^3\s+NVIDIA H100 80GB HBM3\s+`+gputest.UUID(3)+`\s+19\.0/80\.0 GiB\s+61\.0 GiB\s+30%\s+33C\s+74W\s+00000000:13:00\.0\s+0\s+0,1,2$`, lines[4])
	require.Contains(t, out, "driver 580.65.06\n")
	require.Contains(t, out, "plan: engine=vllm device=cuda dtype=auto tp=2 pp=1 gpus=GPU 0,3")
	// 4 GiB weights + 8192 tokens × 128 KiB = 1 GiB of KV cache.
	require.Regexp(t, `model: .*: 4\.0 GiB weights \+ 1\.0 GiB KV cache \(8192 tokens\)\n`, out)
	require.Contains(t, out, "  device cuda: GPU 0,3, gpu_memory_utilization=0.71 (2.5 GiB of 56.8 GiB per device for the model), NVLink, NUMA node 0\n")
	require.Contains(t, out, "  engine arg gpu_memory_utilization=0.71\n  engine arg tensor_parallel_size=2\n")
	require.Contains(t, out, "  export CUDA_VISIBLE_DEVICES="+gputest.UUID(0)+","+gputest.UUID(3)+"\n")
}

func TestGPUsCommandJSON(t *testing.T) {
	withGPUs(t, eightGPUs(t).Lib)
	out, errOut, code := runGPUs("--json", "--tensor-parallel", "4")
	require.Equal(t, 0, code, errOut)
	var rep gpusReport
	require.NoError(t, json.Unmarshal([]byte(out), &rep))
	require.False(t, rep.CPU)
	require.Len(t, rep.Devices, 8)
	require.Equal(t, []int{0, 1, 2, 3}, rep.Plan.Placement.Indices())
	require.InDelta(t, 0.20, rep.Plan.Placement.GPUMemoryUtilization, 1e-9)
	require.InDelta(t, 0.20, rep.Plan.EngineArgs["gpu_memory_utilization"], 1e-9, "what serve would hand vLLM")
	require.Len(t, rep.Plan.Env, 1)
}

func TestGPUsCommandDoesNotFit(t *testing.T) {
	withGPUs(t, eightGPUs(t).Lib)
	_, errOut, code := runGPUs("--model", gputest.Checkpoint(t), "--gpus", "6", "--max-model-len", "16384")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "govllm gpus: launch: gpu: model needs 6.0 GiB (4.0 GiB weights + 2.0 GiB KV cache), "+
		"the best GPU (6) has 10.0 GiB free (5.6 GiB usable with 5% headroom)")
}

// TestSetupLaunch checks what serve does with the plan: the environment is exported, and the
// NVML host is kept for the monitor on GPU hosts only.
func TestSetupLaunch(t *testing.T) {
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	model := gputest.Checkpoint(t)

	t.Run("auto on a GPU host", func(t *testing.T) {
		withGPUs(t, eightGPUs(t).Lib)
		t.Setenv(gpu.VisibleDevicesEnv, "4,5,6,7")
		s, plan, err := setupLaunch(context.Background(), logger, launch.Options{Model: model, Engine: "auto", TensorParallel: 2})
		require.NoError(t, err)
		s.startMonitor(context.Background())
		defer s.Close()
		require.Equal(t, "vllm", plan.Engine)
		require.Equal(t, gputest.UUID(4)+","+gputest.UUID(7), os.Getenv(gpu.VisibleDevicesEnv))
		require.InDelta(t, 0.63, plan.EngineArgs["gpu_memory_utilization"], 1e-9)
		require.Len(t, s.collectors(), 1)
		require.Len(t, s.healthChecks(), 1)
		require.NoError(t, s.healthChecks()[0].Health())
	})
	t.Run("too big refuses before loading", func(t *testing.T) {
		withGPUs(t, eightGPUs(t).Lib)
		t.Setenv(gpu.VisibleDevicesEnv, "6")
		_, _, err := setupLaunch(context.Background(), logger, launch.Options{Model: model, MaxModelLen: 16384})
		require.ErrorIs(t, err, gpu.ErrInsufficientMemory)
		require.Equal(t, "6", os.Getenv(gpu.VisibleDevicesEnv), "the environment is untouched")
	})
	t.Run("CPU: no driver, nothing changes", func(t *testing.T) {
		withGPUs(t, noDriver{})
		t.Setenv(gpu.VisibleDevicesEnv, "")
		os.Unsetenv(gpu.VisibleDevicesEnv)
		s, plan, err := setupLaunch(context.Background(), logger, launch.Options{Model: model})
		require.NoError(t, err)
		s.startMonitor(context.Background())
		defer s.Close()
		require.Equal(t, "cpu", plan.Device)
		require.Empty(t, plan.EngineArgs)
		require.Nil(t, s.collectors())
		require.Nil(t, s.healthChecks())
		_, set := os.LookupEnv(gpu.VisibleDevicesEnv)
		require.False(t, set)
	})
	t.Run("--device cpu never opens NVML", func(t *testing.T) {
		withGPUs(t, &struct{ nvml.Interface }{}) // any call would panic
		s, plan, err := setupLaunch(context.Background(), logger, launch.Options{Model: model, Device: "cpu"})
		require.NoError(t, err)
		s.Close()
		require.Equal(t, "float32", plan.Dtype)
	})
}
