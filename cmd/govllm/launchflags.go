package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"strings"

	"github.com/govllm/govllm/gpu"
	"github.com/govllm/govllm/internal/pyfind"
	"github.com/govllm/govllm/launch"
)

// Seams for tests: the interpreter search and NVML (tests pass go-nvml's mock through
// gpu/gputest).
var (
	findPython = pyfind.Find
	openGPUs   = func(log *slog.Logger) (*gpu.Host, error) { return gpu.Open(gpu.Config{Logger: log}) }
)

// launchFlags are the flags of serve and gpus that make a launch plan.
type launchFlags struct {
	model, engine, python, device, dtype, gpus, loadFormat *string
	maxModelLen, tp, pp                                    *int
	headroom                                               *float64
	engineArgs                                             engineArgFlag
	autoToolChoice                                         *bool
	toolCallParser, reasoningParser, chatTemplate          *string
	structuredOutputTimeout                                *float64
	loraModules                                            loraModulesFlag
	maxLoRAs, maxLoRARank                                  *int
	runner, convert                                        *string
}

func addLaunchFlags(fs *flag.FlagSet) *launchFlags {
	f := &launchFlags{
		model:       fs.String("model", "", "Hugging Face checkpoint directory (default: the bootstrap's models/SmolLM2-135M-Instruct)"),
		engine:      fs.String("engine", pyfind.Auto, "engine: "+strings.Join(pyfind.Engines, ", ")+" (auto: vllm when importable, else transformers), or module:attr"),
		python:      fs.String("python", "", "Python interpreter to embed (default: $GOVLLM_PYTHON, the project's .venv, $VIRTUAL_ENV, python3)"),
		device:      fs.String("device", "", "cpu or cuda (default: cuda when a GPU is visible)"),
		dtype:       fs.String("dtype", "auto", "weights dtype: auto (float32 on CPU, the checkpoint's on GPU), float32, bfloat16, float16"),
		maxModelLen: fs.Int("max-model-len", 0, "context length (default: the model's)"),
		tp:          fs.Int("tensor-parallel-size", 0, "GPUs per pipeline stage (vllm; default 1, or every --gpus)"),
		pp:          fs.Int("pipeline-parallel-size", 0, "pipeline stages (vllm; default 1)"),
		gpus: fs.String("gpus", "", "GPUs to use, by nvidia-smi index or UUID, comma-separated "+
			"(default: the best --tensor-parallel-size of those CUDA_VISIBLE_DEVICES shows)"),
		headroom: fs.Float64("gpu-headroom", gpu.DefaultHeadroom,
			"fraction of each GPU's memory left unused when sizing the engine's share"),
		loadFormat: fs.String("load-format", "", "weights format: auto, safetensors, dummy (random weights for a config.json; both engines), or any vLLM load format"),
	}
	f.autoToolChoice = fs.Bool("enable-auto-tool-choice", false, "let the model call tools on its own (tool_choice \"auto\"), parsed with --tool-call-parser")
	f.toolCallParser = fs.String("tool-call-parser", "", "vLLM's tool-call parser for auto tool choice: hermes, llama3_json, mistral, pythonic, qwen3_xml, openai, ... (both engines)")
	f.reasoningParser = fs.String("reasoning-parser", "", "vLLM's reasoning parser (deepseek_r1, qwen3, ...): the thinking goes to message.reasoning")
	f.chatTemplate = fs.String("chat-template", "", "Jinja chat template (a file, or the template itself) in place of the model's; templates/chatml_tools.jinja renders tools for ChatML models")
	f.structuredOutputTimeout = fs.Float64("structured-output-timeout", launch.DefaultStructuredOutputTimeout, "seconds a request's JSON schema or grammar may take to compile; past it the request gets a 400")
	fs.Var(&f.loraModules, "lora-modules", "LoRA adapter NAME=PATH (a PEFT adapter directory; or vLLM's JSON {\"name\":...,\"path\":...,\"base_model_name\":...}), used by requests whose model is NAME; repeatable")
	f.maxLoRAs = fs.Int("max-loras", 0, "adapters one batch may mix (default: vllm 1, transformers all)")
	f.maxLoRARank = fs.Int("max-lora-rank", 0, "largest adapter rank: 1, 8, 16, 32, 64, 128, 256, 320 or 512 (default 16)")
	f.runner = fs.String("runner", "generate", "generate (chat and completions) or pooling (an embedding model: /v1/embeddings only)")
	f.convert = fs.String("convert", "", "embed: serve a generative checkpoint as an embedding model (with --runner pooling; vllm)")
	fs.IntVar(f.tp, "tensor-parallel", 0, "alias of --tensor-parallel-size")
	fs.Var(&f.engineArgs, "engine-arg", "extra engine argument KEY=VALUE (VALUE parsed as JSON when it can be, e.g. enforce_eager=false); repeatable")
	return f
}

// options are the flags as launch options; withDefaultModel fills in the bootstrap's model.
func (f *launchFlags) options(withDefaultModel bool) launch.Options {
	o := launch.Options{
		Model: *f.model, Engine: *f.engine, Python: *f.python, Device: *f.device, Dtype: *f.dtype,
		MaxModelLen: *f.maxModelLen, TensorParallel: *f.tp, PipelineParallel: *f.pp,
		GPUs: gpu.ParseGPUList(*f.gpus), Headroom: headroomFlag(*f.headroom), LoadFormat: *f.loadFormat,
		EngineArgs:           f.engineArgs,
		EnableAutoToolChoice: *f.autoToolChoice, ToolCallParser: *f.toolCallParser,
		ReasoningParser: *f.reasoningParser, ChatTemplate: *f.chatTemplate,
		StructuredOutputTimeout: *f.structuredOutputTimeout,
		LoRAModules:             f.loraModules, MaxLoRAs: *f.maxLoRAs, MaxLoRARank: *f.maxLoRARank,
		Runner: *f.runner, Convert: *f.convert,
	}
	if o.Model == "" && withDefaultModel {
		o.Model = defaultModel()
	}
	return o
}

// headroomFlag maps --gpu-headroom (0: none) to launch.Options.Headroom (0: the default).
func headroomFlag(f float64) float64 {
	if f == 0 {
		return -1
	}
	return f
}

// engineArgFlag collects --engine-arg KEY=VALUE pairs.
type engineArgFlag map[string]any

func (f *engineArgFlag) String() string { return fmt.Sprint(map[string]any(*f)) }

func (f *engineArgFlag) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("want KEY=VALUE, got %q", s)
	}
	if *f == nil {
		*f = engineArgFlag{}
	}
	var parsed any
	if err := json.Unmarshal([]byte(v), &parsed); err != nil {
		parsed = v // a plain string
	}
	(*f)[k] = parsed
	return nil
}

// loraModulesFlag collects --lora-modules values.
type loraModulesFlag []launch.LoRAModule

func (f *loraModulesFlag) String() string { return fmt.Sprint([]launch.LoRAModule(*f)) }

func (f *loraModulesFlag) Set(s string) error {
	m, err := launch.ParseLoRAModule(s)
	if err != nil {
		return err
	}
	*f = append(*f, m)
	return nil
}
