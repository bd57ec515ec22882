package llm_test

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/llm"
)

func TestAdapterLookupAndWire(t *testing.T) {
	m := llm.ModelInfo{ID: "base", Adapters: []llm.Adapter{{Name: "a", Path: "/a"}, {Name: "b", Path: "/b", Base: "x"}}}
	for name, want := range map[string]bool{"a": true, "b": true, "base": false, "": false, "c": false} {
		got, ok := m.Adapter(name)
		require.Equal(t, want, ok, name)
		if ok {
			require.Equal(t, name, got.Name)
		}
	}
	// The bridge reads the adapter as "lora"; a base request sends no key.
	b, err := json.Marshal(llm.Request{Prompt: "hi", Adapter: "a"})
	require.NoError(t, err)
	require.Contains(t, string(b), `"lora":"a"`)
	b, err = json.Marshal(llm.Request{Prompt: "hi"})
	require.NoError(t, err)
	require.NotContains(t, string(b), "lora")
}
