package launch_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/gpu"
	"github.com/govllm/govllm/gpu/gputest"
	"github.com/govllm/govllm/internal/pyfind"
	"github.com/govllm/govllm/launch"
)

// python is a FindPython that finds an interpreter lacking the missing modules.
func python(missing ...string) func(context.Context, string, string) (*pyfind.PythonInfo, error) {
	return func(_ context.Context, explicit, engine string) (*pyfind.PythonInfo, error) {
		m := map[string]string{}
		for _, n := range missing {
			m[n] = "No module named " + n
		}
		for _, need := range pyfind.RequiredModules(engine) {
			if _, gone := m[need]; gone {
				return nil, errors.Join(pyfind.ErrPythonNotFound, errors.New("cannot import "+need))
			}
		}
		return &pyfind.PythonInfo{Executable: "/venv/bin/python", Version: "3.11.7", LibPython: "/lib/libpython3.11.so", Missing: m}, nil
	}
}

// eightGPUs lists the devices of gputest's 8×H100 box.
func eightGPUs(t *testing.T) func() ([]gpu.Device, error) {
	t.Helper()
	box, err := gputest.EightGPUs()
	require.NoError(t, err)
	h, err := gpu.Open(gpu.Config{Lib: box.Lib, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	require.NoError(t, err)
	t.Cleanup(func() { _ = h.Close() })
	return h.Devices
}

func noDriver() ([]gpu.Device, error) { return nil, gpu.ErrNoNVML }

// env is a LookupEnv with CUDA_VISIBLE_DEVICES unset, or set to the one value given.
func env(visible ...string) func(string) (string, bool) {
	return func(key string) (string, bool) {
		if key == gpu.VisibleDevicesEnv && len(visible) > 0 {
			return visible[0], true
		}
		return "", false
	}
}

// granted stands for the gpu_memory_utilization the placement computed (gpu's tests check
// its value); the plan must hand it to the backend under the backend's own name.
const granted = "granted by placement"

func TestResolve(t *testing.T) {
	model := gputest.Checkpoint(t)
	gpus := eightGPUs(t)
	for _, tc := range []struct {
		name string
		opts launch.Options
		host launch.Host
		// want: the plan's engine, device, dtype, parallel sizes, engine args, devices, env.
		engine, device, dtype string
		tp, pp                int
		args                  map[string]any
		devices               []int
		env                   []string
	}{
		{
			name:   "auto on a GPU host with vllm gets gpu_memory_utilization",
			opts:   launch.Options{Model: model},
			host:   launch.Host{FindPython: python(), Devices: gpus, LookupEnv: env()},
			engine: "vllm", device: "cuda", dtype: "auto", tp: 1, pp: 1,
			args:    map[string]any{"gpu_memory_utilization": granted},
			devices: []int{0}, env: []string{gpu.VisibleDevicesEnv + "=" + gputest.UUID(0)},
		},
		{
			name:   "auto without vllm falls back to transformers, with its own memory flag",
			opts:   launch.Options{Model: model},
			host:   launch.Host{FindPython: python("vllm"), Devices: gpus, LookupEnv: env()},
			engine: "transformers", device: "cuda", dtype: "auto", tp: 1, pp: 1,
			args:    map[string]any{"max_memory_percent": granted},
			devices: []int{0}, env: []string{gpu.VisibleDevicesEnv + "=" + gputest.UUID(0)},
		},
		{
			name:   "auto without vllm on CPU: transformers in float32",
			opts:   launch.Options{Model: model},
			host:   launch.Host{FindPython: python("vllm"), Devices: noDriver},
			engine: "transformers", device: "cpu", dtype: "float32", tp: 1, pp: 1,
			args: map[string]any{},
		},
		{
			name:   "tensor parallel 2 within CUDA_VISIBLE_DEVICES",
			opts:   launch.Options{Model: model, Engine: "vllm", TensorParallel: 2},
			host:   launch.Host{FindPython: python(), Devices: gpus, LookupEnv: env("4,5,6,7")},
			engine: "vllm", device: "cuda", dtype: "auto", tp: 2, pp: 1,
			args:    map[string]any{"tensor_parallel_size": 2, "gpu_memory_utilization": granted},
			devices: []int{4, 7}, env: []string{gpu.VisibleDevicesEnv + "=" + gputest.UUID(4) + "," + gputest.UUID(7)},
		},
		{
			name:   "tensor × pipeline parallel places tp·pp GPUs",
			opts:   launch.Options{Engine: "auto", TensorParallel: 2, PipelineParallel: 2},
			host:   launch.Host{FindPython: python(), Devices: gpus, LookupEnv: env()},
			engine: "vllm", device: "cuda", dtype: "auto", tp: 2, pp: 2,
			args:    map[string]any{"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "gpu_memory_utilization": granted},
			devices: []int{0, 1, 2, 3},
			env:     []string{gpu.VisibleDevicesEnv + "=" + gputest.UUID(0) + "," + gputest.UUID(1) + "," + gputest.UUID(2) + "," + gputest.UUID(3)},
		},
		{
			name:   "tensor_parallel_size from --engine-arg and the GPUs from --gpus",
			opts:   launch.Options{Engine: "vllm", GPUs: []string{"0", "1", "2", "4"}, EngineArgs: map[string]any{"tensor_parallel_size": 2.0}},
			host:   launch.Host{FindPython: python(), Devices: gpus, LookupEnv: env()},
			engine: "vllm", device: "cuda", dtype: "auto", tp: 2, pp: 1,
			args:    map[string]any{"tensor_parallel_size": 2.0, "gpu_memory_utilization": granted},
			devices: []int{0, 2}, env: []string{gpu.VisibleDevicesEnv + "=" + gputest.UUID(0) + "," + gputest.UUID(2)},
		},
		{
			name:   "--gpus without a size: tensor parallel over all of them",
			opts:   launch.Options{GPUs: []string{"0", "2"}},
			host:   launch.Host{FindPython: python(), Devices: gpus, LookupEnv: env()},
			engine: "vllm", device: "cuda", dtype: "auto", tp: 2, pp: 1,
			args:    map[string]any{"tensor_parallel_size": 2, "gpu_memory_utilization": granted},
			devices: []int{0, 2}, env: []string{gpu.VisibleDevicesEnv + "=" + gputest.UUID(0) + "," + gputest.UUID(2)},
		},
		{
			name:   "an explicit gpu_memory_utilization is kept",
			opts:   launch.Options{Engine: "vllm", EngineArgs: map[string]any{"gpu_memory_utilization": 0.5}},
			host:   launch.Host{FindPython: python(), Devices: gpus, LookupEnv: env()},
			engine: "vllm", device: "cuda", dtype: "auto", tp: 1, pp: 1,
			args:    map[string]any{"gpu_memory_utilization": 0.5},
			devices: []int{0}, env: []string{gpu.VisibleDevicesEnv + "=" + gputest.UUID(0)},
		},
		{
			name:   "transformers with an explicit gpu_memory_utilization: the backend maps it itself",
			opts:   launch.Options{Engine: "transformers", EngineArgs: map[string]any{"gpu_memory_utilization": 0.5}},
			host:   launch.Host{FindPython: python(), Devices: gpus, LookupEnv: env()},
			engine: "transformers", device: "cuda", dtype: "auto", tp: 1, pp: 1,
			args:    map[string]any{"gpu_memory_utilization": 0.5},
			devices: []int{0}, env: []string{gpu.VisibleDevicesEnv + "=" + gputest.UUID(0)},
		},
		{
			name:   "--device cpu never lists GPUs",
			opts:   launch.Options{Model: model, Device: "cpu", LoadFormat: "dummy"},
			host:   launch.Host{FindPython: python(), Devices: func() ([]gpu.Device, error) { panic("listed GPUs") }},
			engine: "vllm", device: "cpu", dtype: "float32", tp: 1, pp: 1,
			args: map[string]any{"load_format": "dummy"},
		},
		{
			name:   "CPU host: no driver",
			opts:   launch.Options{Engine: "vllm", Dtype: "bfloat16"},
			host:   launch.Host{FindPython: python(), Devices: noDriver},
			engine: "vllm", device: "cpu", dtype: "bfloat16", tp: 1, pp: 1,
			args: map[string]any{},
		},
		{
			name:   "CUDA_VISIBLE_DEVICES empty hides every GPU",
			opts:   launch.Options{},
			host:   launch.Host{FindPython: python(), Devices: gpus, LookupEnv: env("")},
			engine: "vllm", device: "cpu", dtype: "float32", tp: 1, pp: 1,
			args: map[string]any{},
		},
		{
			name:   "Ray places the GPUs itself",
			opts:   launch.Options{Engine: "vllm", TensorParallel: 4, EngineArgs: map[string]any{"distributed_executor_backend": "ray"}},
			host:   launch.Host{FindPython: python(), Devices: func() ([]gpu.Device, error) { panic("listed GPUs") }},
			engine: "vllm", device: "", dtype: "auto", tp: 4, pp: 1,
			args: map[string]any{"distributed_executor_backend": "ray", "tensor_parallel_size": 4},
		},
		{
			name:   "a custom backend gets the user's arguments only",
			opts:   launch.Options{Engine: "mybackend:create", EngineArgs: map[string]any{"x": 1.0}},
			host:   launch.Host{FindPython: python(), Devices: noDriver},
			engine: "mybackend:create", device: "cpu", dtype: "auto", tp: 1, pp: 1,
			args: map[string]any{"x": 1.0},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := launch.Resolve(context.Background(), tc.opts, tc.host)
			require.NoError(t, err)
			require.Equal(t, tc.engine, p.Engine)
			require.Equal(t, tc.device, p.Device)
			require.Equal(t, tc.dtype, p.Dtype)
			require.Equal(t, tc.tp, p.TensorParallel)
			require.Equal(t, tc.pp, p.PipelineParallel)
			require.Equal(t, "/venv/bin/python", p.Python.Executable)
			want := map[string]any{}
			for k, v := range tc.args {
				if v == granted {
					v = p.Placement.GPUMemoryUtilization
					require.Positive(t, v)
				}
				want[k] = v
			}
			require.Equal(t, want, p.EngineArgs)
			require.Equal(t, tc.env, p.Env)
			if tc.devices == nil {
				require.Nil(t, p.Placement)
			} else {
				require.Equal(t, tc.devices, p.Placement.Indices())
			}
			require.NotEmpty(t, p.Notes)
		})
	}
}

func TestResolveModelSize(t *testing.T) {
	p, err := launch.Resolve(context.Background(), launch.Options{Model: gputest.Checkpoint(t), Engine: "vllm", MaxModelLen: 4096},
		launch.Host{FindPython: python(), Devices: eightGPUs(t), LookupEnv: env()})
	require.NoError(t, err)
	require.Equal(t, uint64(4<<30), p.Model.WeightBytes)
	require.Equal(t, uint64(512<<20), p.Model.KVBytes, "4096 tokens × 128 KiB")
	require.Equal(t, "4.0 GiB weights + 0.5 GiB KV cache (4096 tokens)", p.Model.String())
}

func TestResolveErrors(t *testing.T) {
	model := gputest.Checkpoint(t)
	gpus := eightGPUs(t)
	for _, tc := range []struct {
		name string
		opts launch.Options
		host launch.Host
		is   error
		msg  string
	}{
		{"unknown engine", launch.Options{Engine: "llama.cpp"}, launch.Host{FindPython: python()}, launch.ErrBadOptions, `unknown engine "llama.cpp"`},
		{"bad device", launch.Options{Device: "tpu"}, launch.Host{FindPython: python()}, launch.ErrBadOptions, `--device "tpu": use cpu or cuda`},
		{"bad dtype", launch.Options{Dtype: "fp8"}, launch.Host{FindPython: python()}, launch.ErrBadOptions, `--dtype "fp8"`},
		{"transformers cannot shard", launch.Options{Engine: "transformers", TensorParallel: 2}, launch.Host{FindPython: python()}, launch.ErrBadOptions, "need --engine vllm"},
		{"auto fell back to transformers", launch.Options{TensorParallel: 2}, launch.Host{FindPython: python("vllm"), Devices: gpus}, launch.ErrBadOptions, "install vLLM for tensor or pipeline parallelism"},
		{"no interpreter can run it", launch.Options{Engine: "vllm"}, launch.Host{FindPython: python("vllm")}, pyfind.ErrPythonNotFound, "cannot import vllm"},
		{"nothing at all", launch.Options{}, launch.Host{FindPython: python("vllm", "torch")}, pyfind.ErrPythonNotFound, "can import neither"},
		{"--gpus on a CPU host", launch.Options{GPUs: []string{"0"}}, launch.Host{FindPython: python(), Devices: noDriver}, gpu.ErrNoNVML, "--gpus 0"},
		{"--gpus with --device cpu", launch.Options{GPUs: []string{"0"}, Device: "cpu"}, launch.Host{FindPython: python()}, launch.ErrBadOptions, "contradicts --device cpu"},
		{"--device cuda on a CPU host", launch.Options{Device: "cuda"}, launch.Host{FindPython: python(), Devices: noDriver}, gpu.ErrNoNVML, "--device cuda"},
		{"too big refuses before loading", launch.Options{Model: model, Engine: "vllm", MaxModelLen: 16384},
			launch.Host{FindPython: python(), Devices: gpus, LookupEnv: env("6")}, gpu.ErrInsufficientMemory, "model needs 6.0 GiB"},
		{"a bad integer argument", launch.Options{EngineArgs: map[string]any{"tensor_parallel_size": "two"}}, launch.Host{FindPython: python()}, launch.ErrBadOptions, `tensor_parallel_size: want an integer, got "two"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := launch.Resolve(context.Background(), tc.opts, tc.host)
			require.ErrorIs(t, err, tc.is)
			require.ErrorContains(t, err, tc.msg)
		})
	}
}

func TestCheckParsingOptions(t *testing.T) {
	tmpl := filepath.Join(t.TempDir(), "t.jinja")
	require.NoError(t, os.WriteFile(tmpl, []byte("{{ messages }}"), 0o644))
	cases := []struct {
		name string
		opts launch.Options
		want string // "" means valid
	}{
		{"auto tool choice with a parser", launch.Options{EnableAutoToolChoice: true, ToolCallParser: "hermes"}, ""},
		{"auto tool choice without a parser", launch.Options{EnableAutoToolChoice: true}, "--enable-auto-tool-choice needs --tool-call-parser"},
		{"a parser without auto tool choice", launch.Options{ToolCallParser: "hermes"}, "add --enable-auto-tool-choice"},
		{"negative timeout", launch.Options{StructuredOutputTimeout: -1}, "--structured-output-timeout"},
		{"template file", launch.Options{ChatTemplate: tmpl}, ""},
		{"inline template", launch.Options{ChatTemplate: "{% for m in messages %}{{ m.content }}{% endfor %}"}, ""},
		{"missing template file", launch.Options{ChatTemplate: "/nonexistent/x.jinja"}, "--chat-template /nonexistent/x.jinja"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := launch.Check(tc.opts)
			if tc.want == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, launch.ErrBadOptions)
			require.ErrorContains(t, err, tc.want)
		})
	}
}
