package server

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"runtime/debug"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/llm"
)

// syncBuffer is a log sink the handlers of parallel requests may share.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func TestRequestIDHeader(t *testing.T) {
	t.Parallel()
	var got llm.Request
	var gotTok llm.TokenizeRequest
	b := &fakeTokenizer{
		fakeBackend: backendWith(nil, &got),
		tokenizeFn: func(_ context.Context, req llm.TokenizeRequest) (llm.TokenizeResult, error) {
			gotTok = req
			return llm.TokenizeResult{TokenIDs: []int32{1}}, nil
		},
	}
	b.generateFn = func(_ context.Context, req llm.Request) (llm.TokenStream, error) {
		got = req
		return scripted(llm.Usage{}, nil, llm.Delta{Text: "ok", FinishReason: "stop"}), nil
	}
	logs := &syncBuffer{}
	s := newTestServer(t, b, func(c *Config) {
		c.APIKey = "sk-secret"
		c.Logger = slog.New(slog.NewTextHandler(logs, nil))
	})
	tests := []struct {
		name, method, path, body string
		auth                     bool
		status                   int
		bodyID, engineID         string // the response body's "id", llm.Request.ID
	}{
		{"chat", http.MethodPost, "/v1/chat/completions", hello + `}`, true, 200, "chatcmpl-abc-1", "chatcmpl-abc-1"},
		{"completion", http.MethodPost, "/v1/completions", `{"prompt":"hi"}`, true, 200, "cmpl-abc-1", "cmpl-abc-1"},
		{"tokenize", http.MethodPost, "/tokenize", `{"prompt":"hi"}`, false, 200, "", ""},
		{"models", http.MethodGet, "/v1/models", "", true, 200, "", ""},
		{"bad request", http.MethodPost, "/v1/chat/completions", `{}`, true, 400, "", ""},
		{"unauthorized", http.MethodGet, "/v1/models", "", false, 401, "", ""},
		{"not found", http.MethodGet, "/nope", "", false, 404, "", ""},
		{"wrong method", http.MethodGet, "/v1/chat/completions", "", true, 405, "", ""},
		{"version", http.MethodGet, "/version", "", false, 200, "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := newRequest(tt.method, tt.path, tt.body)
			req.Header.Set(requestIDHeader, "abc-1")
			if tt.auth {
				req.Header.Set("Authorization", "Bearer sk-secret")
			}
			got = llm.Request{}
			rec := serve(s, req)
			require.Equal(t, tt.status, rec.Code, "body: %s", rec.Body)
			require.Equal(t, "abc-1", rec.Header().Get(requestIDHeader))
			if tt.bodyID != "" {
				var resp struct {
					ID string `json:"id"`
				}
				require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &resp))
				require.Equal(t, tt.bodyID, resp.ID)
				require.Equal(t, tt.engineID, got.ID)
			}
			require.Contains(t, logs.String(), `msg="http request" request_id=abc-1 method=`+tt.method+` path=`+tt.path)
		})
	}
	require.Equal(t, "tokenize-abc-1", gotTok.ID)
	require.Contains(t, logs.String(), "status=401")
}

func TestRequestIDGenerated(t *testing.T) {
	t.Parallel()
	var got llm.Request
	s := newTestServer(t, backendWith(scripted(llm.Usage{}, nil, llm.Delta{FinishReason: "stop"}), &got))
	rec := do(s, http.MethodPost, "/v1/chat/completions", hello+`}`)
	require.Equal(t, 200, rec.Code)
	require.Equal(t, "test", rec.Header().Get(requestIDHeader)) // the newID seam
	require.Equal(t, "chatcmpl-test", got.ID)

	// The real generator: an id of its own per request, echoed and used in the body.
	s = New(Config{Backend: &fakeBackend{info: testInfo}, Logger: slog.New(slog.DiscardHandler)})
	a, b := do(s, http.MethodGet, "/v1/models", ""), do(s, http.MethodGet, "/v1/models", "")
	require.Regexp(t, `^[0-9a-f]{16}$`, a.Header().Get(requestIDHeader))
	require.NotEqual(t, a.Header().Get(requestIDHeader), b.Header().Get(requestIDHeader))
}

func TestRequestIDInvalid(t *testing.T) {
	t.Parallel()
	called := false
	b := &fakeBackend{info: testInfo, generateFn: func(context.Context, llm.Request) (llm.TokenStream, error) {
		called = true
		return nil, nil
	}}
	s := newTestServer(t, b)
	tests := []struct {
		name   string
		values []string
	}{
		{"space", []string{"a b"}},
		{"empty", []string{""}},
		{"too long", []string{strings.Repeat("x", maxRequestIDLen+1)}},
		{"control", []string{"a\x01b"}},
		{"non-ASCII", []string{"héllo"}},
		{"two headers", []string{"a", "b"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := newRequest(http.MethodPost, "/v1/chat/completions", hello+`}`)
			req.Header[requestIDHeader] = tt.values
			rec := serve(s, req)
			requireError(t, rec, 400, "BadRequestError", requestIDHeader)
			require.Equal(t, "test", rec.Header().Get(requestIDHeader), "a new id names the refusal")
		})
	}
	require.False(t, called)
	// The longest id allowed, and every printable character, pass.
	for _, id := range []string{strings.Repeat("x", maxRequestIDLen), "!~azAZ09-_.:/{}"} {
		require.Nil(t, checkRequestID([]string{id}))
	}
}

func TestRequestIDOutsideServer(t *testing.T) {
	t.Parallel()
	r := newRequest(http.MethodGet, "/", "")
	require.Regexp(t, `^cmpl-[0-9a-f]{16}$`, requestID(r, "cmpl-"))
}

func TestVersion(t *testing.T) {
	t.Parallel()
	info := testInfo
	info.BackendVersion = "0.32.0"
	s := newTestServer(t, &fakeBackend{info: info}, func(c *Config) { c.Version = "1.2.3"; c.APIKey = "k" })
	rec := do(s, http.MethodGet, "/version", "")
	require.Equal(t, 200, rec.Code)
	require.JSONEq(t, `{"version":"1.2.3","backend":"fake","backend_version":"0.32.0"}`, rec.Body.String())

	s = newTestServer(t, &fakeBackend{info: llm.ModelInfo{ID: testModel}})
	rec = do(s, http.MethodGet, "/version", "")
	var v map[string]string
	require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &v))
	require.NotEmpty(t, v["version"])
	require.NotEqual(t, "1.2.3", v["version"])
	require.NotContains(t, v, "backend")
}

func TestBuildVersion(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		bi   debug.BuildInfo
		want string
	}{
		{"module version", debug.BuildInfo{Main: debug.Module{Version: "v0.4.0"}}, "v0.4.0"},
		{"local build", debug.BuildInfo{Main: debug.Module{Version: "(devel)"}, Settings: []debug.BuildSetting{
			{Key: "vcs.revision", Value: "8ab1e27f00112233445566778899aabbccddeeff"}, {Key: "vcs.modified", Value: "false"}}}, "dev+8ab1e27f0011"},
		{"dirty", debug.BuildInfo{Main: debug.Module{Version: "(devel)"}, Settings: []debug.BuildSetting{
			{Key: "vcs.revision", Value: "8ab1e27"}, {Key: "vcs.modified", Value: "true"}}}, "dev+8ab1e27-dirty"},
		{"nothing known", debug.BuildInfo{Main: debug.Module{Version: "(devel)"}}, "dev"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			require.Equal(t, tt.want, buildVersion(&tt.bi))
		})
	}
	require.Equal(t, "1.0", govllmVersion("1.0"))
	require.NotEqual(t, "", govllmVersion("dev"))
}
