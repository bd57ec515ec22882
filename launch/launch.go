// Package launch turns what a user asked for (flags of govllm serve, a registry entry) into one
// printable plan: the interpreter, the backend ("auto" decided here), the device and dtype, the
// checkpoint's size, the GPU placement, each backend's final engine arguments and the
// environment to export. govllm serve, govllm gpus and govllm server add all go through it, so
// the default engine gets the same placement as a named one, and nothing else in the binary
// knows a backend's argument names.
//
// Resolve is pure apart from its two seams (finding Python and listing GPUs, both in [Host]),
// so it is tested without Python or GPUs.
package launch

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/govllm/govllm/gpu"
	"github.com/govllm/govllm/internal/pyfind"
)

// Options is what the user asked for. Zero values mean the defaults noted on each field.
type Options struct {
	// Model is the checkpoint directory; empty skips sizing (govllm gpus without --model).
	Model string `json:"model,omitempty"`
	// Engine is "auto" (the default), "vllm", "transformers" or a custom "module:attr".
	Engine string `json:"engine,omitempty"`
	// Python is the interpreter to embed; empty means pyfind's search order.
	Python string `json:"python,omitempty"`
	// Device is "cpu", "cuda" or "" (cuda when a GPU is visible, else cpu).
	Device string `json:"device,omitempty"`
	// Dtype is "auto" (the default), "float32", "bfloat16" or "float16".
	Dtype string `json:"dtype,omitempty"`
	// MaxModelLen is the context the KV cache must hold; 0 means the model's.
	MaxModelLen int `json:"max_model_len,omitempty"`
	// TensorParallel and PipelineParallel are the parallel sizes; 0 means 1 (TensorParallel:
	// as many as GPUs lists, when it lists any).
	TensorParallel   int `json:"tensor_parallel_size,omitempty"`
	PipelineParallel int `json:"pipeline_parallel_size,omitempty"`
	// GPUs restricts placement to these devices (nvidia-smi indices or UUIDs).
	GPUs []string `json:"gpus,omitempty"`
	// Headroom is the fraction of each GPU's memory left unused; 0 means gpu.DefaultHeadroom,
	// negative none.
	Headroom float64 `json:"gpu_headroom,omitempty"`
	// LoadFormat is the weights format (auto, safetensors, dummy, …); empty means the backend's.
	LoadFormat string `json:"load_format,omitempty"`
	// EngineArgs are the user's extra engine arguments (--engine-arg), passed through; an
	// argument the plan would set itself (gpu_memory_utilization, say) is kept as given.
	EngineArgs map[string]any `json:"engine_args,omitempty"`
	// EnableAutoToolChoice turns on "auto" tool choice, parsed with ToolCallParser (vLLM's
	// --enable-auto-tool-choice and --tool-call-parser).
	EnableAutoToolChoice bool   `json:"enable_auto_tool_choice,omitempty"`
	ToolCallParser       string `json:"tool_call_parser,omitempty"`
	// ReasoningParser splits reasoning from content in chat responses (vLLM's parser names).
	ReasoningParser string `json:"reasoning_parser,omitempty"`
	// ChatTemplate overrides the model's chat template: a Jinja file, or the template itself.
	ChatTemplate string `json:"chat_template,omitempty"`
	// StructuredOutputTimeout bounds a constraint's compile, in seconds; 0 means
	// DefaultStructuredOutputTimeout.
	StructuredOutputTimeout float64 `json:"structured_output_timeout,omitempty"`
	// LoRAModules are the LoRA adapters to serve beside the model (--lora-modules); MaxLoRAs
	// is how many one batch may mix (0: the backend's default), MaxLoRARank the largest rank
	// (0: DefaultMaxLoRARank).
	LoRAModules []LoRAModule `json:"lora_modules,omitempty"`
	MaxLoRAs    int          `json:"max_loras,omitempty"`
	MaxLoRARank int          `json:"max_lora_rank,omitempty"`
	// ServedModelName is the name clients use for the model (empty: the model directory's
	// name); Check keeps adapter names off it.
	ServedModelName string `json:"served_model_name,omitempty"`
	// Runner is vLLM's --runner: "generate" (the default) or "pooling" (embeddings only).
	Runner string `json:"runner,omitempty"`
	// Convert is vLLM's --convert: "embed" serves a generative checkpoint as an embedding
	// model (with Runner "pooling").
	Convert string `json:"convert,omitempty"`
}

// Host is what Resolve asks of the machine. Nil fields use the real thing.
type Host struct {
	// FindPython finds the interpreter for an engine name (pyfind.Find).
	FindPython func(ctx context.Context, explicit, engine string) (*pyfind.PythonInfo, error)
	// Devices lists the NVIDIA GPUs; an error (gpu.ErrNoNVML, gpu.ErrNoGPU, …) means a CPU
	// host. Nil means no GPUs were looked for.
	Devices func() ([]gpu.Device, error)
	// LookupEnv reads CUDA_VISIBLE_DEVICES (os.LookupEnv).
	LookupEnv func(key string) (string, bool)
}

// Python is the interpreter a plan embeds.
type Python struct {
	Executable string `json:"executable"`
	Version    string `json:"version"`
	LibPython  string `json:"libpython"`
}

// Plan is what govllm will run: every decision, with the reasons in Notes. It is a plain value,
// printed by govllm gpus --json.
type Plan struct {
	// Python is the interpreter to embed.
	Python Python `json:"python"`
	// Engine is the backend, never "auto".
	Engine string `json:"engine"`
	// Device is "cpu" or "cuda", or "" when placement is left to Ray.
	Device string `json:"device"`
	// Dtype is the weights dtype the engine is asked for.
	Dtype string `json:"dtype"`
	// Model is the checkpoint and what it needs on a device; nil when Options.Model is empty.
	Model *ModelNeeds `json:"model,omitempty"`
	// TensorParallel and PipelineParallel are the parallel sizes (at least 1).
	TensorParallel   int `json:"tensor_parallel_size"`
	PipelineParallel int `json:"pipeline_parallel_size"`
	// Placement is the GPUs chosen; nil on CPU and when Ray places.
	Placement *gpu.Placement `json:"placement,omitempty"`
	// EngineArgs are the backend's final extra arguments.
	EngineArgs map[string]any `json:"engine_args"`
	// Env is what to export before the engine starts (KEY=VALUE).
	Env []string `json:"env,omitempty"`
	// Notes explain the decisions, one line each.
	Notes []string `json:"notes"`
}

// Sentinel errors of Resolve; the messages name the fix.
var (
	// ErrBadOptions marks options that cannot work together, or a value out of range.
	ErrBadOptions = errors.New("launch: bad options")
)

var dtypes = []string{"auto", "float32", "bfloat16", "float16"}

// Check validates opts without looking at the machine: the engine name, the device, the dtype,
// the parallel sizes and what the named engine supports. Resolve calls it first; govllm
// server add calls it alone, since the machine that will run an entry may not be this one.
func Check(opts Options) error {
	engine := orDefault(opts.Engine, pyfind.Auto)
	if err := pyfind.CheckEngine(engine); err != nil {
		return fmt.Errorf("%w: %v", ErrBadOptions, err)
	}
	if d := opts.Device; d != "" && d != "cpu" && d != "cuda" {
		return fmt.Errorf("%w: --device %q: use cpu or cuda (or leave it out: cuda when a GPU is visible)", ErrBadOptions, d)
	}
	if d := orDefault(opts.Dtype, "auto"); !slices.Contains(dtypes, d) {
		return fmt.Errorf("%w: --dtype %q: use %s", ErrBadOptions, d, strings.Join(dtypes, ", "))
	}
	if opts.TensorParallel < 0 || opts.PipelineParallel < 0 {
		return fmt.Errorf("%w: parallel sizes must be positive (--tensor-parallel-size %d, --pipeline-parallel-size %d)", ErrBadOptions, opts.TensorParallel, opts.PipelineParallel)
	}
	if opts.MaxModelLen < 0 {
		return fmt.Errorf("%w: --max-model-len %d must be positive", ErrBadOptions, opts.MaxModelLen)
	}
	if engine == pyfind.Transformers && (opts.TensorParallel > 1 || opts.PipelineParallel > 1) {
		return fmt.Errorf("%w: the transformers engine runs on one device: tensor and pipeline parallelism need --engine vllm", ErrBadOptions)
	}
	if opts.Device == "cpu" && len(opts.GPUs) > 0 {
		return fmt.Errorf("%w: --gpus %s contradicts --device cpu", ErrBadOptions, strings.Join(opts.GPUs, ","))
	}
	for _, k := range []string{"tensor_parallel_size", "pipeline_parallel_size", "kv_cache_memory_bytes"} {
		if _, err := intArg(opts.EngineArgs, k); err != nil {
			return fmt.Errorf("%w: --engine-arg %s: %v", ErrBadOptions, k, err)
		}
	}
	if err := checkLoRA(opts); err != nil {
		return err
	}
	if err := checkRunner(opts); err != nil {
		return err
	}
	return checkParsing(opts)
}

// Resolve makes the plan for opts on host h. It fails, with the fix, when the options cannot
// work, no interpreter can run the engine, or the model fits on no GPU set.
func Resolve(ctx context.Context, opts Options, h Host) (Plan, error) {
	if err := Check(opts); err != nil {
		return Plan{}, err
	}
	if h.FindPython == nil {
		h.FindPython = pyfind.Find
	}
	engine := orDefault(opts.Engine, pyfind.Auto)
	py, err := h.FindPython(ctx, opts.Python, engine)
	if err != nil {
		return Plan{}, fmt.Errorf("launch: %w", err)
	}
	p := Plan{
		Python:     Python{Executable: py.Executable, Version: py.Version, LibPython: py.LibPython},
		EngineArgs: map[string]any{},
	}
	if p.Engine, err = pyfind.ChooseBackend(engine, py); err != nil {
		return Plan{}, fmt.Errorf("launch: %w", err)
	}
	if engine == pyfind.Auto {
		p.note("engine auto: %s (%s)", p.Engine, autoReason(p.Engine))
	}
	for k, v := range opts.EngineArgs {
		p.EngineArgs[k] = v
	}
	if opts.LoadFormat != "" {
		p.EngineArgs["load_format"] = opts.LoadFormat
	}
	// Check read these already; they are well formed.
	argTP, _ := intArg(opts.EngineArgs, "tensor_parallel_size")
	argPP, _ := intArg(opts.EngineArgs, "pipeline_parallel_size")
	p.TensorParallel = firstPositive(opts.TensorParallel, argTP, 1)
	p.PipelineParallel = firstPositive(opts.PipelineParallel, argPP, 1)
	if p.Engine == pyfind.Transformers && p.TensorParallel*p.PipelineParallel > 1 {
		return Plan{}, fmt.Errorf("%w: auto chose transformers (no vllm in %s), which runs on one device: install vLLM for tensor or pipeline parallelism", ErrBadOptions, py.Executable)
	}

	if err := p.place(opts, h); err != nil {
		return Plan{}, err
	}
	p.chooseDtype(opts)
	p.engineArgs(opts)
	p.parsingArgs(opts)
	p.loraArgs(opts)
	p.runnerArgs(opts)
	return p, nil
}

// autoReason says why auto chose engine.
func autoReason(engine string) string {
	if engine == pyfind.VLLM {
		return "the interpreter can import vllm"
	}
	return "the interpreter cannot import vllm"
}

// note adds a line to Notes.
func (p *Plan) note(format string, args ...any) {
	p.Notes = append(p.Notes, fmt.Sprintf(format, args...))
}

// String is the plan in one line: engine, device, dtype, parallelism and GPUs.
func (p Plan) String() string {
	s := fmt.Sprintf("engine=%s device=%s dtype=%s", p.Engine, orDefault(p.Device, "ray"), p.Dtype)
	if p.TensorParallel*p.PipelineParallel > 1 {
		s += fmt.Sprintf(" tp=%d pp=%d", p.TensorParallel, p.PipelineParallel)
	}
	if p.Placement != nil {
		s += " gpus=" + p.Placement.String()
	}
	return s
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

func firstPositive(xs ...int) int {
	for _, x := range xs {
		if x > 0 {
			return x
		}
	}
	return 0
}
