package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/gpu"
	"github.com/govllm/govllm/gpu/gputest"
)

// withGPUs points openGPUs at a fake host for one test (not parallel: openGPUs is global).
func withGPUs(t *testing.T, lib nvml.Interface) {
	t.Helper()
	old := openGPUs
	openGPUs = func(log *slog.Logger) (*gpu.Host, error) { return gpu.Open(gpu.Config{Lib: lib, Logger: log}) }
	t.Cleanup(func() { openGPUs = old })
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

// checkpoint writes a model directory: 4 GiB of bfloat16 weights (a sparse file) and a config
// whose KV cache takes 128 KiB per token.
func checkpoint(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	f, err := os.Create(filepath.Join(dir, "model.safetensors"))
	require.NoError(t, err)
	require.NoError(t, f.Truncate(4<<30))
	require.NoError(t, f.Close())
	require.NoError(t, os.WriteFile(filepath.Join(dir, "config.json"), []byte(`{"hidden_size":4096,
		"num_attention_heads":32,"num_key_value_heads":8,"num_hidden_layers":32,"max_position_embeddings":8192,
		"torch_dtype":"bfloat16"}`), 0o644))
	return dir
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
	require.Equal(t, "no NVIDIA driver found; running on CPU\n", out)

	out, _, code = runGPUs("--json")
	require.Equal(t, 0, code)
	require.JSONEq(t, `{"cpu":true,"message":"no NVIDIA driver found; running on CPU","devices":[]}`, out)

	_, errOut, code = runGPUs("--gpus", "0")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "--gpus 0: gpu: no NVIDIA driver found")
}

// TestGPUsCommandThisHost runs the real NVML: on a host without the driver it prints the
// one line and exits 0.
func TestGPUsCommandThisHost(t *testing.T) {
	out, errOut, code := runGPUs()
	require.Equal(t, 0, code, errOut)
	if _, err := gpu.Open(gpu.Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}); err != nil {
		require.Equal(t, "no NVIDIA driver found; running on CPU\n", out)
	}
}

func TestGPUsCommandTable(t *testing.T) {
	withGPUs(t, eightGPUs(t).Lib)
	out, errOut, code := runGPUs("--tensor-parallel-size", "2", "--model", checkpoint(t))
	require.Equal(t, 0, code, errOut)
	lines := strings.Split(out, "\n")
	require.Regexp(t, `^GPU\s+NAME\s+UUID\s+MEMORY USED/TOTAL\s+FREE\s+UTIL\s+TEMP\s+POWER\s+PCI BUS ID\s+NUMA\s+NVLINK$`, lines[0])
	require.Regexp(t, `^3\s+NVIDIA H100 80GB HBM3\s+`+gputest.UUID(3)+`\s+19\.0/80\.0 GiB\s+61\.0 GiB\s+30%\s+33C\s+74W\s+00000000:13:00\.0\s+0\s+0,1,2$`, lines[4])
	require.Contains(t, out, "driver 580.65.06\n")
	// 4 GiB weights + 8192 tokens × 128 KiB = 1 GiB of KV cache.
	require.Regexp(t, `placement \(--tensor-parallel-size 2, .*: 4\.0 GiB weights \+ 1\.0 GiB KV cache \(8192 tokens\)\): `+
		`GPU 0,3, gpu_memory_utilization=0\.71 \(2\.5 GiB of 56\.8 GiB per device for the model\), NVLink, NUMA node 0\n`, out)
	require.Contains(t, out, "CUDA_VISIBLE_DEVICES="+gputest.UUID(0)+","+gputest.UUID(3)+"\n")
}

func TestGPUsCommandJSON(t *testing.T) {
	withGPUs(t, eightGPUs(t).Lib)
	out, errOut, code := runGPUs("--json", "--tensor-parallel", "4")
	require.Equal(t, 0, code, errOut)
	var rep gpusReport
	require.NoError(t, json.Unmarshal([]byte(out), &rep))
	require.False(t, rep.CPU)
	require.Len(t, rep.Devices, 8)
	require.Equal(t, []int{0, 1, 2, 3}, rep.Placement.Indices())
	require.InDelta(t, 0.20, rep.Placement.GPUMemoryUtilization, 1e-9)
	require.Len(t, rep.Env, 1)
}

func TestGPUsCommandDoesNotFit(t *testing.T) {
	withGPUs(t, eightGPUs(t).Lib)
	_, errOut, code := runGPUs("--model", checkpoint(t), "--gpus", "6", "--max-model-len", "16384")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "govllm gpus: gpu: model needs 6.0 GiB (4.0 GiB weights + 2.0 GiB KV cache), "+
		"the best GPU (6) has 10.0 GiB free (5.6 GiB usable with 5% headroom)")
}

func TestSetupGPUs(t *testing.T) {
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	model := checkpoint(t)
	opts := func(engine string, tp int, gpus string, extra map[string]any) serveGPUOptions {
		headroom := gpu.DefaultHeadroom
		return serveGPUOptions{flags: gpuFlags{gpus: &gpus, headroom: &headroom}, model: model, engine: engine,
			dtype: "auto", tp: tp, extra: extra}
	}

	t.Run("vllm gets the devices and gpu_memory_utilization", func(t *testing.T) {
		withGPUs(t, eightGPUs(t).Lib)
		t.Setenv(gpu.VisibleDevicesEnv, "4,5,6,7")
		extra := map[string]any{}
		s, err := setupGPUs(logger, opts("vllm", 2, "", extra))
		require.NoError(t, err)
		s.startMonitor(context.Background())
		defer s.Close()
		require.Equal(t, gputest.UUID(4)+","+gputest.UUID(7), os.Getenv(gpu.VisibleDevicesEnv))
		require.Equal(t, map[string]any{"gpu_memory_utilization": 0.63}, extra)
		require.Len(t, s.collectors(), 1)
		require.Len(t, s.healthChecks(), 1)
		require.NoError(t, s.healthChecks()[0].Health())
	})
	t.Run("an explicit gpu_memory_utilization is kept, other engines get none", func(t *testing.T) {
		for _, tc := range []struct {
			engine string
			extra  map[string]any
			want   map[string]any
		}{
			{"vllm", map[string]any{"gpu_memory_utilization": 0.5}, map[string]any{"gpu_memory_utilization": 0.5}},
			{"auto", map[string]any{}, map[string]any{}},
			{"transformers", map[string]any{}, map[string]any{}},
		} {
			withGPUs(t, eightGPUs(t).Lib)
			t.Setenv(gpu.VisibleDevicesEnv, "")
			os.Unsetenv(gpu.VisibleDevicesEnv)
			s, err := setupGPUs(logger, opts(tc.engine, 0, "", tc.extra))
			require.NoError(t, err)
			s.Close()
			require.Equal(t, tc.want, tc.extra, tc.engine)
			require.Equal(t, gputest.UUID(0), os.Getenv(gpu.VisibleDevicesEnv))
		}
	})
	t.Run("tensor_parallel_size from --engine-arg and --gpus", func(t *testing.T) {
		withGPUs(t, eightGPUs(t).Lib)
		t.Setenv(gpu.VisibleDevicesEnv, "")
		os.Unsetenv(gpu.VisibleDevicesEnv)
		s, err := setupGPUs(logger, opts("vllm", 0, "0,1,2,4", map[string]any{"tensor_parallel_size": 2.0}))
		require.NoError(t, err)
		s.Close()
		require.Equal(t, gputest.UUID(0)+","+gputest.UUID(2), os.Getenv(gpu.VisibleDevicesEnv))
	})
	t.Run("too big refuses before loading", func(t *testing.T) {
		withGPUs(t, eightGPUs(t).Lib)
		t.Setenv(gpu.VisibleDevicesEnv, "6")
		o := opts("vllm", 1, "", map[string]any{})
		o.maxModelLen = 16384 // 4 GiB weights + 2 GiB KV cache; GPU 6 grants 5.6 GiB
		_, err := setupGPUs(logger, o)
		require.ErrorIs(t, err, gpu.ErrInsufficientMemory)
		require.Equal(t, "6", os.Getenv(gpu.VisibleDevicesEnv), "the environment is untouched")
	})
	t.Run("CPU: no driver, nothing changes", func(t *testing.T) {
		withGPUs(t, noDriver{})
		t.Setenv(gpu.VisibleDevicesEnv, "")
		os.Unsetenv(gpu.VisibleDevicesEnv)
		extra := map[string]any{}
		s, err := setupGPUs(logger, opts("vllm", 2, "", extra))
		require.NoError(t, err)
		s.startMonitor(context.Background())
		defer s.Close()
		require.Empty(t, extra)
		require.Nil(t, s.collectors())
		require.Nil(t, s.healthChecks())
		_, set := os.LookupEnv(gpu.VisibleDevicesEnv)
		require.False(t, set)

		_, err = setupGPUs(logger, opts("vllm", 0, "0", extra))
		require.ErrorIs(t, err, gpu.ErrNoNVML)
	})
	t.Run("--device cpu never opens NVML", func(t *testing.T) {
		withGPUs(t, &struct{ nvml.Interface }{}) // any call would panic
		o := opts("vllm", 0, "", map[string]any{})
		o.device = "cpu"
		s, err := setupGPUs(logger, o)
		require.NoError(t, err)
		s.Close()
	})
}
