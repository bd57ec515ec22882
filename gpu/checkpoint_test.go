package gpu

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

// writeFiles creates files of the given sizes (or contents) under dir.
func writeFiles(t *testing.T, dir string, sizes map[string]int, contents map[string]string) {
	t.Helper()
	for name, n := range sizes {
		f, err := os.Create(filepath.Join(dir, name))
		require.NoError(t, err)
		require.NoError(t, f.Truncate(int64(n)))
		require.NoError(t, f.Close())
	}
	for name, c := range contents {
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte(c), 0o644))
	}
}

const llamaConfig = `{"architectures":["LlamaForCausalLM"],"hidden_size":4096,"num_attention_heads":32,
	"num_key_value_heads":8,"num_hidden_layers":32,"max_position_embeddings":131072,"torch_dtype":"bfloat16"}`

func TestReadCheckpoint(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		sizes    map[string]int
		contents map[string]string
		files    []string
		bytes    uint64
		kv       uint64 // values per token
		maxPos   int
		dtype    string
	}{
		{name: "sharded safetensors with index",
			sizes: map[string]int{"model-00001-of-00002.safetensors": 1000, "model-00002-of-00002.safetensors": 500,
				"stale.safetensors": 99999, "pytorch_model.bin": 7777},
			contents: map[string]string{"config.json": llamaConfig, "model.safetensors.index.json": `{"weight_map":{
				"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors","c":"model-00002-of-00002.safetensors"}}`},
			files: []string{"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}, bytes: 1500,
			kv: 2 * 32 * 8 * 128, maxPos: 131072, dtype: "bfloat16"},
		{name: "safetensors preferred over bin and consolidated",
			sizes: map[string]int{"model.safetensors": 300, "consolidated.safetensors": 300, "pytorch_model.bin": 600, "training_args.bin": 5},
			files: []string{"model.safetensors"}, bytes: 300},
		{name: "consolidated only",
			sizes: map[string]int{"consolidated.safetensors": 300},
			files: []string{"consolidated.safetensors"}, bytes: 300},
		{name: "pytorch bins",
			sizes: map[string]int{"pytorch_model-00001-of-00002.bin": 10, "pytorch_model-00002-of-00002.bin": 20, "training_args.bin": 5},
			files: []string{"pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"}, bytes: 30},
		{name: "gguf", sizes: map[string]int{"m.Q4_K_M.gguf": 42}, files: []string{"m.Q4_K_M.gguf"}, bytes: 42},
		{name: "config only (dummy weights)",
			contents: map[string]string{"config.json": `{"hidden_size":576,"num_attention_heads":9,"num_key_value_heads":3,
				"num_hidden_layers":30,"max_position_embeddings":8192,"torch_dtype":"float32"}`},
			kv: 2 * 30 * 3 * 64, maxPos: 8192, dtype: "float32"},
		{name: "multimodal text_config and explicit head_dim",
			contents: map[string]string{"config.json": `{"torch_dtype":"bfloat16","text_config":{"hidden_size":2560,
				"num_attention_heads":8,"num_key_value_heads":4,"head_dim":256,"num_hidden_layers":34,"max_position_embeddings":131072}}`},
			kv: 2 * 34 * 4 * 256, maxPos: 131072, dtype: "bfloat16"},
		{name: "MLA",
			contents: map[string]string{"config.json": `{"num_hidden_layers":61,"kv_lora_rank":512,"qk_rope_head_dim":64,
				"num_attention_heads":128,"hidden_size":7168,"max_position_embeddings":163840,"torch_dtype":"bfloat16"}`},
			kv: 61 * (512 + 64), maxPos: 163840, dtype: "bfloat16"},
		{name: "no config, no weights"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			writeFiles(t, dir, tt.sizes, tt.contents)
			c, err := ReadCheckpoint(dir)
			require.NoError(t, err)
			require.Equal(t, tt.files, c.WeightFiles)
			require.Equal(t, tt.bytes, c.WeightBytes)
			require.Equal(t, tt.kv, c.KVValuesPerToken)
			require.Equal(t, tt.maxPos, c.MaxPositions)
			require.Equal(t, tt.dtype, c.Dtype)
			n, err := EstimateModelBytes(dir)
			require.NoError(t, err)
			require.Equal(t, tt.bytes, n)
		})
	}
}

func TestReadCheckpointErrors(t *testing.T) {
	t.Parallel()
	_, err := ReadCheckpoint(filepath.Join(t.TempDir(), "missing"))
	require.ErrorIs(t, err, os.ErrNotExist)

	dir := t.TempDir()
	writeFiles(t, dir, nil, map[string]string{"config.json": "{not json"})
	_, err = ReadCheckpoint(dir)
	require.ErrorContains(t, err, "config.json")

	dir = t.TempDir()
	writeFiles(t, dir, nil, map[string]string{"model.safetensors.index.json": `{"weight_map":{"a":"gone.safetensors"}}`})
	_, err = ReadCheckpoint(dir)
	require.ErrorIs(t, err, os.ErrNotExist, "a shard named by the index is missing")
}

func TestCheckpointServedBytes(t *testing.T) {
	t.Parallel()
	f32 := Checkpoint{WeightBytes: 1000, Dtype: "float32", KVValuesPerToken: 10}
	bf16 := Checkpoint{WeightBytes: 1000, Dtype: "bfloat16", KVValuesPerToken: 10}
	quant := Checkpoint{WeightBytes: 1000, Dtype: "float16", Quantized: true, KVValuesPerToken: 10}
	tests := []struct {
		name    string
		c       Checkpoint
		dtype   string
		weights uint64
		kv      uint64 // for 100 tokens
	}{
		{"float32 checkpoint served in 16 bits by default", f32, "auto", 500, 2000},
		{"float32 checkpoint served in float32", f32, "float32", 1000, 4000},
		{"bfloat16 checkpoint as is", bf16, "", 1000, 2000},
		{"bfloat16 checkpoint upcast", bf16, "float32", 2000, 4000},
		{"quantized checkpoint as is", quant, "float32", 1000, 4000},
		{"unknown dtype", Checkpoint{WeightBytes: 1000, Dtype: "int4weird", KVValuesPerToken: 10}, "auto", 1000, 2000},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			require.Equal(t, tt.weights, tt.c.ServedWeightBytes(tt.dtype))
			require.Equal(t, tt.kv, tt.c.KVBytes(100, tt.dtype))
			require.Zero(t, tt.c.KVBytes(0, tt.dtype))
		})
	}
}
