package main

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestServerAddLoRAFlags: govllm server add checks --lora-modules as serve does (serve's flags).
func TestServerAddLoRAFlags(t *testing.T) {
	xdg(t)
	model := modelDir(t)
	adapter := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(adapter, "adapter_config.json"), []byte(`{"peft_type":"LORA","r":8}`), 0o644))
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"an adapter", []string{"ok1", "--model", model, "--", "--lora-modules", "a=" + adapter, "--max-loras", "1"}, 0, ""},
		{"the JSON form", []string{"ok2", "--model", model, "--", "--lora-modules", `{"name":"a","path":"` + adapter + `"}`}, 0, ""},
		{"no such directory", []string{"x", "--model", model, "--", "--lora-modules", "a=/no/such/adapter"}, 1,
			"--lora-modules a=/no/such/adapter: not a PEFT adapter directory"},
		{"not NAME=PATH", []string{"x", "--model", model, "--", "--lora-modules", "a"}, 1, "want NAME=PATH"},
		{"the served name", []string{"x", "--model", model, "--", "--served-model-name", "m", "--lora-modules", "m=" + adapter}, 1,
			"the name is the served model's"},
		{"max-loras without adapters", []string{"x", "--model", model, "--", "--max-loras", "2"}, 1, "--max-loras 2 needs adapters"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, errOut, code := cli(append([]string{"server", "add"}, tc.args...)...)
			require.Equal(t, tc.code, code, errOut)
			require.Contains(t, errOut, tc.want)
		})
	}
}
