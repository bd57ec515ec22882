package server

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/llm"
)

func TestRoutes(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, method, path string
		status             int
		typ                string
		allow              string
	}{
		{"unknown path", http.MethodGet, "/v1/nope", 404, "NotFoundError", ""},
		{"root", http.MethodGet, "/", 404, "NotFoundError", ""},
		{"trailing slash", http.MethodGet, "/v1/models/", 404, "NotFoundError", ""},
		{"GET chat", http.MethodGet, "/v1/chat/completions", 405, "MethodNotAllowedError", "POST"},
		{"POST models", http.MethodPost, "/v1/models", 405, "MethodNotAllowedError", "GET, HEAD"},
		{"DELETE health", http.MethodDelete, "/health", 405, "MethodNotAllowedError", "GET, HEAD"},
	}
	s := newTestServer(t, &fakeBackend{info: testInfo})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			rec := do(s, tt.method, tt.path, "")
			requireError(t, rec, tt.status, tt.typ, "")
			require.Equal(t, tt.allow, rec.Header().Get("Allow"))
		})
	}
}

func TestModels(t *testing.T) {
	t.Parallel()
	s := newTestServer(t, &fakeBackend{info: testInfo})
	rec := do(s, http.MethodGet, "/v1/models", "")
	require.Equal(t, http.StatusOK, rec.Code)
	require.Equal(t, "application/json", rec.Header().Get("Content-Type"))
	require.JSONEq(t, `{"object":"list","data":[{"id":"test-model","object":"model","created":1700000000,
		"owned_by":"govllm","root":"/models/test","max_model_len":2048}]}`, rec.Body.String())
}

func TestHealth(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		err    error
		status int
	}{
		{"healthy", nil, http.StatusOK},
		{"dead", fmt.Errorf("engine: poller stopped: %w", llm.ErrEngineDead), http.StatusServiceUnavailable},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			s := newTestServer(t, &fakeBackend{info: testInfo, healthFn: func() error { return tt.err }})
			rec := do(s, http.MethodGet, "/health", "")
			if tt.err == nil {
				require.Equal(t, http.StatusOK, rec.Code)
				require.Empty(t, rec.Body.String())
				return
			}
			msg := requireError(t, rec, tt.status, "ServiceUnavailableError", "")
			require.Equal(t, tt.err.Error(), msg)
		})
	}
}

func TestAPIKey(t *testing.T) {
	t.Parallel()
	stream := func() llm.TokenStream { return scripted(llm.Usage{}, nil, llm.Delta{FinishReason: "stop"}) }
	b := &fakeBackend{info: testInfo, generateFn: func(context.Context, llm.Request) (llm.TokenStream, error) {
		return stream(), nil
	}}
	s := newTestServer(t, b, func(c *Config) { c.APIKey = "sk-secret" })
	tests := []struct {
		name, method, path, auth string
		status                   int
	}{
		{"no key", http.MethodPost, "/v1/chat/completions", "", 401},
		{"wrong key", http.MethodPost, "/v1/chat/completions", "Bearer sk-wrong", 401},
		{"prefix of key", http.MethodPost, "/v1/chat/completions", "Bearer sk-secre", 401},
		{"not bearer", http.MethodPost, "/v1/chat/completions", "Basic sk-secret", 401},
		{"right key", http.MethodPost, "/v1/chat/completions", "Bearer sk-secret", 200},
		{"scheme case", http.MethodPost, "/v1/chat/completions", "bearer sk-secret", 200},
		{"models needs key", http.MethodGet, "/v1/models", "", 401},
		{"models with key", http.MethodGet, "/v1/models", "Bearer sk-secret", 200},
		{"health is open", http.MethodGet, "/health", "", 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			req := newRequest(tt.method, tt.path, hello+`}`)
			if tt.auth != "" {
				req.Header.Set("Authorization", tt.auth)
			}
			rec := serve(s, req)
			if tt.status == 401 {
				requireError(t, rec, 401, "AuthenticationError", "")
				return
			}
			require.Equal(t, tt.status, rec.Code, rec.Body.String())
		})
	}
}

func TestNewWithoutBackend(t *testing.T) {
	t.Parallel()
	require.PanicsWithValue(t, ErrNoBackend, func() { New(Config{}) })
}

func TestMetrics(t *testing.T) {
	fb := &fakeBackend{info: llm.ModelInfo{ID: "m"}}
	srv := newTestServer(t, fb, func(c *Config) {
		c.Stats = func(context.Context) (llm.Stats, error) { return llm.Stats{BackendRunning: 3}, nil }
	})
	rec := httptest.NewRecorder()
	srv.ServeHTTP(rec, newRequest(http.MethodGet, "/metrics", ""))
	require.Equal(t, http.StatusOK, rec.Code)
	body := rec.Body.String()
	require.Contains(t, body, `govllm:num_requests_running{engine="0",model_name="m"} 0`)
	require.Contains(t, body, `govllm:backend_num_requests_running{engine="0",model_name="m"} 3`)
}
