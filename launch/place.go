package launch

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"

	"github.com/govllm/govllm/gpu"
	"github.com/govllm/govllm/internal/pyfind"
)

// ModelNeeds is what a model asks of the GPUs, from its checkpoint.
type ModelNeeds struct {
	Dir         string `json:"dir"`
	WeightBytes uint64 `json:"weight_bytes"`
	KVBytes     uint64 `json:"kv_cache_bytes"`
	KVTokens    int    `json:"kv_cache_tokens"`
	// SizeError says why the checkpoint could not be sized (placement then counts no model);
	// the engine reports a missing model itself, with its fix.
	SizeError string `json:"size_error,omitempty"`
}

// EstimateModel sizes the checkpoint in dir for dtype: its served weights plus a KV cache for
// one sequence of maxLen tokens (0: the model's context), or kvBytes when the user fixed it.
func EstimateModel(dir, dtype string, maxLen int, kvBytes uint64) (ModelNeeds, error) {
	n := ModelNeeds{Dir: dir}
	ck, err := gpu.ReadCheckpoint(dir)
	if err != nil {
		return n, err
	}
	n.WeightBytes = ck.ServedWeightBytes(dtype)
	if kvBytes > 0 {
		n.KVBytes = kvBytes
		return n, nil
	}
	n.KVTokens = maxLen
	if n.KVTokens <= 0 {
		n.KVTokens = ck.MaxPositions
	}
	n.KVBytes = ck.KVBytes(n.KVTokens, dtype)
	return n, nil
}

// String is "1.2 GiB weights + 0.3 GiB KV cache (8192 tokens)".
func (n ModelNeeds) String() string {
	s := fmt.Sprintf("%.1f GiB weights + %.1f GiB KV cache", float64(n.WeightBytes)/gpu.GiB, float64(n.KVBytes)/gpu.GiB)
	if n.KVTokens > 0 {
		s += fmt.Sprintf(" (%d tokens)", n.KVTokens)
	}
	return s
}

// CPUMessage is the one line saying why govllm runs on CPU, for an error of Host.Devices.
func CPUMessage(err error) string {
	switch {
	case errors.Is(err, gpu.ErrNoNVML):
		return gpu.NoDriverMessage
	case errors.Is(err, gpu.ErrNoGPU):
		return "no NVIDIA GPU found; running on CPU"
	default:
		return fmt.Sprintf("NVML unavailable (%v); running on CPU", err)
	}
}

// realDevices lists the GPUs through NVML for a Host without Devices.
func realDevices() ([]gpu.Device, error) {
	h, err := gpu.Open(gpu.Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		return nil, err
	}
	defer h.Close()
	return h.Devices()
}

// place decides the device and, on a GPU host, the GPUs: after p.Engine and the parallel
// sizes are known, so that every engine, "auto" included, is placed the same way.
func (p *Plan) place(opts Options, h Host) error {
	if opts.Model != "" {
		p.Model = &ModelNeeds{Dir: opts.Model}
	}
	if opts.Device == "cpu" {
		p.Device = "cpu"
		p.note("device cpu: --device cpu")
		return nil
	}
	if backend, _ := opts.EngineArgs["distributed_executor_backend"].(string); backend == "ray" {
		p.note("GPU placement left to Ray (distributed_executor_backend=ray): CUDA_VISIBLE_DEVICES and gpu_memory_utilization are Ray's and vLLM's")
		return nil
	}
	devices := h.Devices
	if devices == nil {
		devices = realDevices
	}
	devs, err := devices()
	if err != nil {
		switch {
		case len(opts.GPUs) > 0:
			return fmt.Errorf("launch: --gpus %s: %w", strings.Join(opts.GPUs, ","), err)
		case opts.Device == "cuda":
			return fmt.Errorf("launch: --device cuda: %w", err)
		}
		p.Device = "cpu"
		p.note("device cpu: %s", CPUMessage(err))
		return nil
	}

	// One device for transformers; for vLLM tp×pp, or every listed GPU when --gpus names
	// them and no size was given.
	world := p.TensorParallel * p.PipelineParallel
	tpGiven := opts.TensorParallel > 0 || opts.EngineArgs["tensor_parallel_size"] != nil
	if p.Engine != pyfind.Transformers && !tpGiven && len(opts.GPUs) > 0 {
		world = 0
	}
	var kvFixed uint64
	if n, _ := intArg(opts.EngineArgs, "kv_cache_memory_bytes"); n > 0 {
		kvFixed = uint64(n) * uint64(max(world, len(opts.GPUs), 1))
	}
	var needs ModelNeeds
	if opts.Model != "" {
		needs, err = EstimateModel(opts.Model, orDefault(opts.Dtype, "auto"), opts.MaxModelLen, kvFixed)
		if err != nil {
			needs.SizeError = err.Error()
		}
		p.Model = &needs
	}
	placement, err := gpu.Place(devs, gpu.Request{
		TensorParallel: world, GPUs: opts.GPUs, Headroom: opts.Headroom, LookupEnv: h.LookupEnv,
		ModelBytes: needs.WeightBytes, KVBytes: needs.KVBytes,
	})
	if err != nil {
		return fmt.Errorf("launch: %w", err)
	}
	if placement.CPU() {
		if opts.Device == "cuda" {
			return fmt.Errorf("launch: --device cuda, but %s hides every GPU", gpu.VisibleDevicesEnv)
		}
		p.Device = "cpu"
		p.note("device cpu: %s hides every GPU", gpu.VisibleDevicesEnv)
		return nil
	}
	p.Device = "cuda"
	p.Placement = &placement
	p.Env = placement.Env()
	if world == 0 {
		p.TensorParallel = max(len(placement.Devices)/p.PipelineParallel, 1)
	}
	p.note("device cuda: %s", placement)
	return nil
}
