package gpu

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Checkpoint is what placement needs to know about a Hugging Face checkpoint directory.
type Checkpoint struct {
	// Dir is the checkpoint directory.
	Dir string `json:"dir"`
	// WeightFiles are the weight files an engine would load, relative to Dir: the shards named
	// by model.safetensors.index.json, else *.safetensors, else the PyTorch *.bin (or its
	// index), else *.pt/*.pth, else *.gguf.
	WeightFiles []string `json:"weight_files"`
	// WeightBytes is their size on disk, summed (0 with none, e.g. a config-only directory
	// for --load-format dummy).
	WeightBytes uint64 `json:"weight_bytes"`
	// Dtype is config.json's torch_dtype (or dtype), e.g. "bfloat16"; "" when absent.
	Dtype string `json:"dtype"`
	// Quantized is true when config.json has a quantization_config: the files' size is then
	// the served size whatever the dtype.
	Quantized bool `json:"quantized"`
	// KVValuesPerToken is the number of cached key and value scalars per token over all layers
	// (2·layers·kv_heads·head_dim; MLA models: layers·(kv_lora_rank+qk_rope_head_dim)); 0 when
	// config.json does not say.
	KVValuesPerToken uint64 `json:"kv_values_per_token"`
	// MaxPositions is config.json's max_position_embeddings (0 when absent).
	MaxPositions int `json:"max_position_embeddings"`
}

// EstimateModelBytes is the size of the weights the checkpoint in dir would load; see
// [ReadCheckpoint].
func EstimateModelBytes(dir string) (uint64, error) {
	c, err := ReadCheckpoint(dir)
	if err != nil {
		return 0, err
	}
	return c.WeightBytes, nil
}

// ReadCheckpoint sizes the weights in dir and reads the KV-cache shape from its config.json.
// A missing or unreadable config.json leaves the KV fields zero; a missing dir is an error.
func ReadCheckpoint(dir string) (Checkpoint, error) {
	c := Checkpoint{Dir: dir}
	st, err := os.Stat(dir)
	if err != nil {
		return c, fmt.Errorf("gpu: checkpoint: %w", err)
	}
	if !st.IsDir() {
		return c, fmt.Errorf("gpu: checkpoint %s is not a directory", dir)
	}
	files, err := weightFiles(dir)
	if err != nil {
		return c, fmt.Errorf("gpu: checkpoint %s: %w", dir, err)
	}
	for _, f := range files {
		fi, err := os.Stat(filepath.Join(dir, f)) // follows the Hugging Face cache's symlinks
		if err != nil {
			return c, fmt.Errorf("gpu: checkpoint %s: %w", dir, err)
		}
		c.WeightFiles = append(c.WeightFiles, f)
		c.WeightBytes += uint64(fi.Size())
	}
	if err := c.readConfig(); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return c, fmt.Errorf("gpu: checkpoint %s: %w", dir, err)
	}
	return c, nil
}

// weightFiles picks the files an engine would load, as described on Checkpoint.WeightFiles.
func weightFiles(dir string) ([]string, error) {
	for _, index := range []string{"model.safetensors.index.json", "pytorch_model.bin.index.json"} {
		b, err := os.ReadFile(filepath.Join(dir, index))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		var idx struct {
			WeightMap map[string]string `json:"weight_map"`
		}
		if err := json.Unmarshal(b, &idx); err != nil {
			return nil, fmt.Errorf("%s: %w", index, err)
		}
		set := map[string]bool{}
		for _, f := range idx.WeightMap {
			set[f] = true
		}
		out := make([]string, 0, len(set))
		for f := range set {
			out = append(out, f)
		}
		sort.Strings(out)
		if len(out) > 0 {
			return out, nil
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	byExt := map[string][]string{}
	for _, e := range entries {
		if e.IsDir() {
			continue
		}
		name := e.Name()
		ext := strings.ToLower(filepath.Ext(name))
		switch {
		case ext == ".bin" && (name == "training_args.bin" || strings.HasPrefix(name, "optimizer")):
			continue
		case ext == ".safetensors" && strings.HasPrefix(name, "consolidated"):
			ext = ".consolidated" // Mistral's single-file copy of the same weights
		}
		byExt[ext] = append(byExt[ext], name)
	}
	for _, ext := range []string{".safetensors", ".consolidated", ".bin", ".pt", ".pth", ".gguf"} {
		if files := byExt[ext]; len(files) > 0 {
			sort.Strings(files)
			return files, nil
		}
	}
	return nil, nil
}

// readConfig fills the config.json fields.
func (c *Checkpoint) readConfig() error {
	b, err := os.ReadFile(filepath.Join(c.Dir, "config.json"))
	if err != nil {
		return err
	}
	var cfg map[string]any
	if err := json.Unmarshal(b, &cfg); err != nil {
		return fmt.Errorf("config.json: %w", err)
	}
	// Multimodal checkpoints keep the language model's shape under text_config.
	if tc, ok := cfg["text_config"].(map[string]any); ok {
		merged := map[string]any{}
		for k, v := range cfg {
			merged[k] = v
		}
		for k, v := range tc {
			merged[k] = v
		}
		cfg = merged
	}
	num := func(keys ...string) uint64 {
		for _, k := range keys {
			if v, ok := cfg[k].(float64); ok && v > 0 {
				return uint64(v)
			}
		}
		return 0
	}
	for _, k := range []string{"torch_dtype", "dtype"} {
		if s, ok := cfg[k].(string); ok && s != "" {
			c.Dtype = s
			break
		}
	}
	_, c.Quantized = cfg["quantization_config"]
	c.MaxPositions = int(num("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"))
	layers := num("num_hidden_layers", "n_layer", "num_layers")
	if rank := num("kv_lora_rank"); rank > 0 {
		c.KVValuesPerToken = layers * (rank + num("qk_rope_head_dim"))
		return nil
	}
	heads := num("num_attention_heads", "n_head")
	kvHeads := num("num_key_value_heads", "num_kv_heads")
	if kvHeads == 0 {
		kvHeads = heads
		if mq, _ := cfg["multi_query"].(bool); mq {
			kvHeads = 1
		}
	}
	headDim := num("head_dim")
	if hidden := num("hidden_size", "n_embd", "d_model"); headDim == 0 && heads > 0 {
		headDim = hidden / heads
	}
	c.KVValuesPerToken = 2 * layers * kvHeads * headDim
	return nil
}

// ServedWeightBytes is the weights' size in GPU memory at dtype (--dtype; "auto" or ""
// means the checkpoint's, with float32 served in 16 bits, as vLLM does).
func (c Checkpoint) ServedWeightBytes(dtype string) uint64 {
	if c.Quantized {
		return c.WeightBytes
	}
	from, to := dtypeBytes(c.Dtype), dtypeBytes(c.servedDtype(dtype))
	if from == 0 || to == 0 || from == to {
		return c.WeightBytes
	}
	return c.WeightBytes / from * to
}

// KVBytes is the KV cache for tokens tokens at dtype ("auto" or "" as in ServedWeightBytes);
// 0 when the config does not give the shape.
func (c Checkpoint) KVBytes(tokens int, dtype string) uint64 {
	if tokens <= 0 {
		return 0
	}
	b := dtypeBytes(c.servedDtype(dtype))
	if b == 0 {
		b = 2
	}
	return c.KVValuesPerToken * uint64(tokens) * b
}

// servedDtype resolves "auto" the way vLLM does on a GPU.
func (c Checkpoint) servedDtype(dtype string) string {
	if dtype != "" && dtype != "auto" {
		return dtype
	}
	switch c.Dtype {
	case "", "float32", "float":
		return "bfloat16"
	}
	return c.Dtype
}

// dtypeBytes is the element size of a torch dtype name; 0 when unknown.
func dtypeBytes(dtype string) uint64 {
	switch strings.TrimPrefix(strings.ToLower(dtype), "torch.") {
	case "float32", "float", "fp32":
		return 4
	case "float16", "half", "fp16", "bfloat16", "bf16":
		return 2
	case "fp8", "float8_e4m3fn", "float8_e5m2", "fp8_e4m3", "fp8_e5m2":
		return 1
	}
	return 0
}
