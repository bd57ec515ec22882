package server

import (
	"context"
	"encoding/json"
	"net/http"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/llm"
)

// loraInfo is testInfo with two adapters, one naming its own base.
var loraInfo = func() llm.ModelInfo {
	m := testInfo
	m.Adapters = []llm.Adapter{
		{Name: "sql-lora", Path: "/adapters/sql"},
		{Name: "chat-lora", Path: "/adapters/chat", Base: "other-base"},
	}
	return m
}()

func TestModelsListsAdapters(t *testing.T) {
	t.Parallel()
	s := newTestServer(t, &fakeBackend{info: loraInfo})
	rec := do(s, http.MethodGet, "/v1/models", "")
	require.Equal(t, http.StatusOK, rec.Code)
	require.JSONEq(t, `{"object":"list","data":[
		{"id":"test-model","object":"model","created":1700000000,"owned_by":"govllm","root":"/models/test","max_model_len":2048},
		{"id":"sql-lora","object":"model","created":1700000000,"owned_by":"govllm","root":"/adapters/sql","parent":"test-model","max_model_len":2048},
		{"id":"chat-lora","object":"model","created":1700000000,"owned_by":"govllm","root":"/adapters/chat","parent":"other-base","max_model_len":2048}]}`,
		rec.Body.String())
}

func TestAdapterRouting(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, path, body string
		info             llm.ModelInfo
		status           int
		adapter, model   string // the request's Adapter, the response's model
	}{
		{"completion on adapter", "/v1/completions", `{"model":"sql-lora","prompt":"a","max_tokens":1}`, loraInfo, 200, "sql-lora", "sql-lora"},
		{"completion on base", "/v1/completions", `{"model":"test-model","prompt":"a","max_tokens":1}`, loraInfo, 200, "", "test-model"},
		{"completion without model", "/v1/completions", `{"prompt":"a","max_tokens":1}`, loraInfo, 200, "", "test-model"},
		{"chat on adapter", "/v1/chat/completions", `{"model":"chat-lora","messages":[{"role":"user","content":"hi"}]}`, loraInfo, 200, "chat-lora", "chat-lora"},
		{"chat on base", "/v1/chat/completions", `{"model":"test-model","messages":[{"role":"user","content":"hi"}]}`, loraInfo, 200, "", "test-model"},
		{"unknown completion", "/v1/completions", `{"model":"nope-lora","prompt":"a"}`, loraInfo, 404, "", ""},
		{"unknown chat", "/v1/chat/completions", `{"model":"nope-lora","messages":[{"role":"user","content":"hi"}]}`, loraInfo, 404, "", ""},
		// an engine without adapters: an adapter's name is an unknown model
		{"adapter on engine without", "/v1/completions", `{"model":"sql-lora","prompt":"a"}`, testInfo, 404, "", ""},
		{"adapter chat on engine without", "/v1/chat/completions", `{"model":"sql-lora","messages":[{"role":"user","content":"hi"}]}`, testInfo, 404, "", ""},
		// the parent named by another adapter is not itself served
		{"foreign base", "/v1/completions", `{"model":"other-base","prompt":"a"}`, loraInfo, 404, "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var got llm.Request
			called := false
			b := backendWith(scripted(llm.Usage{PromptTokens: 1, CompletionTokens: 1}, nil,
				llm.Delta{Text: "x", FinishReason: "stop"}), &got)
			gen := b.generateFn
			b.generateFn = func(ctx2 context.Context, req llm.Request) (llm.TokenStream, error) {
				called = true
				return gen(ctx2, req)
			}
			b.info = tt.info
			s := newTestServer(t, b)
			rec := do(s, http.MethodPost, tt.path, tt.body)
			if tt.status != 200 {
				requireError(t, rec, tt.status, "NotFoundError", "model")
				require.False(t, called, "a refused request reached the engine")
				return
			}
			require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
			require.True(t, called)
			require.Equal(t, tt.adapter, got.Adapter)
			var resp struct {
				Model string `json:"model"`
			}
			require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &resp))
			require.Equal(t, tt.model, resp.Model)
		})
	}
}

func TestAdapterFor(t *testing.T) {
	t.Parallel()
	for name, want := range map[string]string{"": "", "test-model": "", "sql-lora": "sql-lora", "chat-lora": "chat-lora", "x": ""} {
		require.Equal(t, want, adapterFor(name, loraInfo), name)
		require.Equal(t, want == "" && name != "" && name != "test-model", checkModel(name, loraInfo) != nil, name)
	}
}
