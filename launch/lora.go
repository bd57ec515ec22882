package launch

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/govllm/govllm/internal/pyfind"
)

// LoRAModule is one --lora-modules adapter: NAME=PATH, or vLLM's JSON form
// {"name": …, "path": …, "base_model_name": …}.
type LoRAModule struct {
	// Name is the model name clients use for the adapter.
	Name string `json:"name"`
	// Path is the adapter's directory (adapter_config.json and its weights).
	Path string `json:"path"`
	// BaseModelName is the adapter's parent in /v1/models; empty means the served model.
	BaseModelName string `json:"base_model_name,omitempty"`
}

// ParseLoRAModule reads one --lora-modules value: NAME=PATH or vLLM's JSON object.
func ParseLoRAModule(s string) (LoRAModule, error) {
	var m LoRAModule
	if strings.HasPrefix(strings.TrimSpace(s), "{") {
		dec := json.NewDecoder(strings.NewReader(s))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&m); err != nil {
			return m, fmt.Errorf("want NAME=PATH or {\"name\": ..., \"path\": ..., \"base_model_name\": ...}: %v", err)
		}
	} else {
		name, path, ok := strings.Cut(s, "=")
		if !ok {
			return m, fmt.Errorf("want NAME=PATH, got %q", s)
		}
		m = LoRAModule{Name: name, Path: path}
	}
	if m.Name == "" || m.Path == "" {
		return m, fmt.Errorf("an adapter needs a name and a path, got %q", s)
	}
	return m, nil
}

// LoRARanks are the values vLLM accepts for --max-lora-rank.
var LoRARanks = []int{1, 8, 16, 32, 64, 128, 256, 320, 512}

// DefaultMaxLoRARank is vLLM's default --max-lora-rank.
const DefaultMaxLoRARank = 16

// checkLoRA validates the adapters: unique names that are not the served model's, directories
// holding an adapter_config.json whose rank fits --max-lora-rank.
func checkLoRA(opts Options) error {
	if len(opts.LoRAModules) == 0 {
		switch {
		case opts.MaxLoRAs != 0:
			return fmt.Errorf("%w: --max-loras %d needs adapters: add --lora-modules NAME=PATH", ErrBadOptions, opts.MaxLoRAs)
		case opts.MaxLoRARank != 0:
			return fmt.Errorf("%w: --max-lora-rank %d needs adapters: add --lora-modules NAME=PATH", ErrBadOptions, opts.MaxLoRARank)
		}
		return nil
	}
	if pyfind.IsCustom(orDefault(opts.Engine, pyfind.Auto)) {
		return fmt.Errorf("%w: --lora-modules needs --engine vllm or transformers (a custom engine loads no adapters)", ErrBadOptions)
	}
	if opts.MaxLoRAs < 0 {
		return fmt.Errorf("%w: --max-loras %d must be positive", ErrBadOptions, opts.MaxLoRAs)
	}
	maxRank := opts.MaxLoRARank
	if maxRank == 0 {
		maxRank = DefaultMaxLoRARank
	} else if !slices.Contains(LoRARanks, maxRank) {
		return fmt.Errorf("%w: --max-lora-rank %d: use one of %v (vLLM's sizes)", ErrBadOptions, maxRank, LoRARanks)
	}
	served := opts.ServedModelName
	if served == "" && opts.Model != "" {
		served = filepath.Base(opts.Model)
	}
	seen := map[string]bool{}
	for _, m := range opts.LoRAModules {
		switch {
		case seen[m.Name]:
			return fmt.Errorf("%w: --lora-modules names %q twice: give each adapter its own name", ErrBadOptions, m.Name)
		case m.Name == served:
			return fmt.Errorf("%w: --lora-modules %s: the name is the served model's; name the adapter otherwise (or set --served-model-name)", ErrBadOptions, m.Name)
		}
		seen[m.Name] = true
		rank, err := adapterRank(m.Path)
		if err != nil {
			return fmt.Errorf("%w: --lora-modules %s=%s: %v", ErrBadOptions, m.Name, m.Path, err)
		}
		if rank > maxRank {
			return fmt.Errorf("%w: --lora-modules %s has rank %d, above --max-lora-rank %d: raise --max-lora-rank to %d or more", ErrBadOptions, m.Name, rank, maxRank, nextRank(rank))
		}
	}
	if opts.MaxLoRAs > len(opts.LoRAModules) {
		return fmt.Errorf("%w: --max-loras %d is more than the %d adapters given", ErrBadOptions, opts.MaxLoRAs, len(opts.LoRAModules))
	}
	return nil
}

// adapterRank reads a PEFT adapter's rank from its adapter_config.json: r, or the largest of
// its rank_pattern.
func adapterRank(dir string) (int, error) {
	b, err := os.ReadFile(filepath.Join(dir, "adapter_config.json"))
	if err != nil {
		return 0, fmt.Errorf("not a PEFT adapter directory (save one with save_pretrained): %v", err)
	}
	var cfg struct {
		R           int            `json:"r"`
		RankPattern map[string]int `json:"rank_pattern"`
		PeftType    string         `json:"peft_type"`
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		return 0, fmt.Errorf("adapter_config.json: %v", err)
	}
	if cfg.PeftType != "" && cfg.PeftType != "LORA" {
		return 0, fmt.Errorf("adapter_config.json: peft_type %s is not LORA", cfg.PeftType)
	}
	rank := cfg.R
	for _, r := range cfg.RankPattern {
		rank = max(rank, r)
	}
	if rank <= 0 {
		return 0, fmt.Errorf("adapter_config.json: no rank r")
	}
	return rank, nil
}

// nextRank is the smallest vLLM rank size that holds rank.
func nextRank(rank int) int {
	for _, r := range LoRARanks {
		if r >= rank {
			return r
		}
	}
	return rank
}

// loraArgs writes the adapters into the engine arguments: lora_modules (absolute paths) for
// both backends' own loaders, and vLLM's enable_lora, max_loras and max_lora_rank; the
// transformers backend reads max_loras as the number of adapters one batch may mix.
func (p *Plan) loraArgs(opts Options) {
	if len(opts.LoRAModules) == 0 {
		return
	}
	modules := make([]map[string]any, len(opts.LoRAModules))
	for i, m := range opts.LoRAModules {
		path := m.Path
		if abs, err := filepath.Abs(path); err == nil {
			path = abs
		}
		modules[i] = map[string]any{"name": m.Name, "path": path}
		if m.BaseModelName != "" {
			modules[i]["base_model_name"] = m.BaseModelName
		}
	}
	p.EngineArgs["lora_modules"] = modules
	if opts.MaxLoRAs > 0 {
		p.EngineArgs["max_loras"] = opts.MaxLoRAs
	}
	if p.Engine == pyfind.VLLM {
		p.EngineArgs["enable_lora"] = true
		if opts.MaxLoRARank > 0 {
			p.EngineArgs["max_lora_rank"] = opts.MaxLoRARank
		}
	}
	p.note("%d LoRA adapter(s)", len(modules))
}
