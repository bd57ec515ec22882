package launch

import (
	"fmt"
	"math"
	"strconv"

	"github.com/govllm/govllm/internal/pyfind"
)

// chooseDtype settles "auto". On CPU it means float32: vLLM's CPU platform turns auto into
// bfloat16, in which the default model's greedy answers change (the README's example answers
// nonsense) and depend on which requests share a batch; float32 answers as the model does.
func (p *Plan) chooseDtype(opts Options) {
	p.Dtype = orDefault(opts.Dtype, "auto")
	if p.Dtype == "auto" && p.Device == "cpu" && !pyfind.IsCustom(p.Engine) {
		p.Dtype = "float32"
		p.note("dtype float32: auto on CPU (bfloat16 there changes greedy answers and makes them depend on batch composition)")
	}
}

// engineArgs adds what the backend needs from the plan, in its own argument names, to the
// user's engine arguments, which win.
func (p *Plan) engineArgs(opts Options) {
	set := func(key string, v any, why string) {
		if _, given := p.EngineArgs[key]; given {
			p.note("%s=%v as given (the plan's %v unused)", key, p.EngineArgs[key], v)
			return
		}
		p.EngineArgs[key] = v
		if why != "" {
			p.note("%s=%v: %s", key, v, why)
		}
	}
	switch p.Engine {
	case pyfind.VLLM:
		if p.TensorParallel > 1 || opts.TensorParallel > 0 {
			set("tensor_parallel_size", p.TensorParallel, "")
		}
		if p.PipelineParallel > 1 || opts.PipelineParallel > 0 {
			set("pipeline_parallel_size", p.PipelineParallel, "")
		}
		if p.Placement != nil {
			set("gpu_memory_utilization", p.Placement.GPUMemoryUtilization, "the memory placement grants each GPU")
		}
	case pyfind.Transformers:
		// The backend reads a given gpu_memory_utilization as its max_memory_percent itself.
		if _, given := p.EngineArgs["gpu_memory_utilization"]; p.Placement != nil && !given {
			set("max_memory_percent", p.Placement.GPUMemoryUtilization, "the memory placement grants the GPU")
		}
	}
}

// intArg reads an integer engine argument, which arrives as a JSON number (float64), an int
// or a string; 0 when absent.
func intArg(args map[string]any, key string) (int, error) {
	switch v := args[key].(type) {
	case nil:
		return 0, nil
	case int:
		return v, nil
	case float64:
		if v != math.Trunc(v) || math.Abs(v) > 1<<53 {
			return 0, fmt.Errorf("want an integer, got %v", v)
		}
		return int(v), nil
	case string:
		n, err := strconv.Atoi(v)
		if err != nil {
			return 0, fmt.Errorf("want an integer, got %q", v)
		}
		return n, nil
	default:
		return 0, fmt.Errorf("want an integer, got %v", v)
	}
}
