package launch_test

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/launch"
)

// adapterDir writes an adapter_config.json of rank r (and nothing else: Check reads only it).
func adapterDir(t *testing.T, r int) string {
	t.Helper()
	dir := t.TempDir()
	cfg := `{"peft_type":"LORA","r":` + strconv.Itoa(r) + `,"lora_alpha":8,"target_modules":["q_proj"]}`
	require.NoError(t, os.WriteFile(filepath.Join(dir, "adapter_config.json"), []byte(cfg), 0o644))
	return dir
}

func TestParseLoRAModule(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want launch.LoRAModule
		err  string
	}{
		{"sql=/a/sql", launch.LoRAModule{Name: "sql", Path: "/a/sql"}, ""},
		{"x=/p=q", launch.LoRAModule{Name: "x", Path: "/p=q"}, ""},
		{`{"name":"sql","path":"/a","base_model_name":"b"}`, launch.LoRAModule{Name: "sql", Path: "/a", BaseModelName: "b"}, ""},
		{"sql", launch.LoRAModule{}, "want NAME=PATH"},
		{"=/a", launch.LoRAModule{}, "needs a name and a path"},
		{"sql=", launch.LoRAModule{}, "needs a name and a path"},
		{`{"name":"sql"}`, launch.LoRAModule{}, "needs a name and a path"},
		{`{"name":"sql","path":"/a","rank":8}`, launch.LoRAModule{}, "unknown field"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := launch.ParseLoRAModule(tc.in)
			if tc.err != "" {
				require.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, got)
		})
	}
}

func TestCheckLoRA(t *testing.T) {
	r8, r32 := adapterDir(t, 8), adapterDir(t, 32)
	mods := func(ms ...launch.LoRAModule) []launch.LoRAModule { return ms }
	for _, tc := range []struct {
		name string
		opts launch.Options
		want string // "" means valid
	}{
		{"one adapter", launch.Options{Model: "/m/base", LoRAModules: mods(launch.LoRAModule{Name: "a", Path: r8})}, ""},
		{"two adapters, max-loras 2", launch.Options{LoRAModules: mods(launch.LoRAModule{Name: "a", Path: r8}, launch.LoRAModule{Name: "b", Path: r8}), MaxLoRAs: 2}, ""},
		{"rank 32 with max-lora-rank 32", launch.Options{LoRAModules: mods(launch.LoRAModule{Name: "a", Path: r32}), MaxLoRARank: 32}, ""},
		{"duplicate name", launch.Options{LoRAModules: mods(launch.LoRAModule{Name: "a", Path: r8}, launch.LoRAModule{Name: "a", Path: r32})}, `--lora-modules names "a" twice`},
		{"name of the model directory", launch.Options{Model: "/m/base", LoRAModules: mods(launch.LoRAModule{Name: "base", Path: r8})}, "the name is the served model's"},
		{"name of the served model", launch.Options{ServedModelName: "srv", LoRAModules: mods(launch.LoRAModule{Name: "srv", Path: r8})}, "the name is the served model's"},
		{"missing directory", launch.Options{LoRAModules: mods(launch.LoRAModule{Name: "a", Path: "/nonexistent/adapter"})}, "--lora-modules a=/nonexistent/adapter: not a PEFT adapter directory"},
		{"rank above the default max", launch.Options{LoRAModules: mods(launch.LoRAModule{Name: "a", Path: r32})}, "rank 32, above --max-lora-rank 16: raise --max-lora-rank to 32"},
		{"a rank vLLM has no size for", launch.Options{LoRAModules: mods(launch.LoRAModule{Name: "a", Path: r8}), MaxLoRARank: 12}, "--max-lora-rank 12: use one of"},
		{"max-loras above the adapters", launch.Options{LoRAModules: mods(launch.LoRAModule{Name: "a", Path: r8}), MaxLoRAs: 2}, "--max-loras 2 is more than the 1 adapters"},
		{"negative max-loras", launch.Options{LoRAModules: mods(launch.LoRAModule{Name: "a", Path: r8}), MaxLoRAs: -1}, "--max-loras -1 must be positive"},
		{"max-loras without adapters", launch.Options{MaxLoRAs: 2}, "--max-loras 2 needs adapters"},
		{"max-lora-rank without adapters", launch.Options{MaxLoRARank: 8}, "--max-lora-rank 8 needs adapters"},
		{"custom engine", launch.Options{Engine: "mymod:create", LoRAModules: mods(launch.LoRAModule{Name: "a", Path: r8})}, "a custom engine loads no adapters"},
	} {
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

func TestResolveLoRAArgs(t *testing.T) {
	r8 := adapterDir(t, 8)
	mods := []launch.LoRAModule{{Name: "a", Path: r8}, {Name: "b", Path: r8, BaseModelName: "other"}}
	want := []map[string]any{{"name": "a", "path": r8}, {"name": "b", "path": r8, "base_model_name": "other"}}
	for _, tc := range []struct {
		name string
		opts launch.Options
		host launch.Host
		args map[string]any
	}{
		{"vllm", launch.Options{Engine: "vllm", Device: "cpu", LoRAModules: mods, MaxLoRAs: 2, MaxLoRARank: 8}, launch.Host{FindPython: python()},
			map[string]any{"lora_modules": want, "enable_lora": true, "max_loras": 2, "max_lora_rank": 8}},
		{"vllm defaults", launch.Options{Engine: "vllm", Device: "cpu", LoRAModules: mods}, launch.Host{FindPython: python()},
			map[string]any{"lora_modules": want, "enable_lora": true}},
		{"transformers", launch.Options{Engine: "transformers", Device: "cpu", LoRAModules: mods, MaxLoRAs: 1}, launch.Host{FindPython: python()},
			map[string]any{"lora_modules": want, "max_loras": 1}},
		{"no adapters", launch.Options{Engine: "vllm", Device: "cpu"}, launch.Host{FindPython: python()}, map[string]any{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := launch.Resolve(context.Background(), tc.opts, tc.host)
			require.NoError(t, err)
			require.Equal(t, tc.args, p.EngineArgs)
		})
	}
}
