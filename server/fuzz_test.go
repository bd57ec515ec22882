package server

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/llm"
)

// fuzzServer answers every request it is given with a stream that finishes each choice. Its
// model has every capability (parsers, structured outputs), so every path is reachable.
func fuzzServer(t *testing.T) *Server {
	b := &fakeBackend{info: fullInfo, generateFn: func(_ context.Context, req llm.Request) (llm.TokenStream, error) {
		if err := req.Validate(); err != nil {
			t.Errorf("the server passed on an invalid request: %v", err)
		}
		var deltas []llm.Delta
		for i := range max(req.Sampling.N, 1) {
			deltas = append(deltas, llm.Delta{Index: i, Text: "x", TokenIDs: []int32{1}, FinishReason: "stop"})
		}
		return scripted(llm.Usage{PromptTokens: 1, CompletionTokens: len(deltas)}, nil, deltas...), nil
	}}
	return New(Config{Backend: b, Logger: slog.New(slog.DiscardHandler), MaxBodyBytes: 1 << 16})
}

// checkAnswer checks that rec is a success (JSON or an event stream ending in [DONE]) or a 4xx
// OpenAI error naming its status.
func checkAnswer(t *testing.T, rec *httptest.ResponseRecorder) {
	switch {
	case rec.Code == http.StatusOK && rec.Header().Get("Content-Type") == "text/event-stream":
		require.True(t, strings.HasSuffix(rec.Body.String(), "data: [DONE]\n\n"), rec.Body.String())
	case rec.Code == http.StatusOK:
		require.True(t, json.Valid(rec.Body.Bytes()), rec.Body.String())
	default:
		require.True(t, rec.Code >= 400 && rec.Code < 500, "status %d: %s", rec.Code, rec.Body)
		var e errorJSON
		require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &e))
		require.Equal(t, rec.Code, e.Error.Code)
		require.NotEmpty(t, e.Error.Message)
		require.NotEmpty(t, e.Error.Type)
	}
}

func fuzzSeeds(f *testing.F, seeds ...string) {
	for _, s := range seeds {
		f.Add([]byte(s))
	}
}

// FuzzDecodeChat feeds arbitrary bodies through POST /v1/chat/completions: none may panic, get
// a 5xx or reach the backend invalid.
func FuzzDecodeChat(f *testing.F) {
	fuzzSeeds(f,
		hello+`}`,
		hello+`,"stream":true,"stream_options":{"include_usage":true},"n":3}`,
		`{"messages":[{"role":"system","content":[{"type":"text","text":"a"}]},{"role":"assistant","content":null},{"role":"user","content":"q"}]}`,
		`{"messages":[{"role":"user","content":"hi"}],"max_tokens":5,"temperature":0.5,"top_p":0.9,"top_k":-1,"min_p":0.1,"seed":1,"stop":["a"],"stop_token_ids":[1]}`,
		`{"messages":[{"role":"user","content":"hi"}],"presence_penalty":1,"frequency_penalty":-1,"repetition_penalty":1.2,"min_tokens":2,"max_completion_tokens":4}`,
		`{"messages":[{"role":"tool","content":"x"}]}`,
		`{"messages":[{"role":"user","content":"w"},{"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c","content":"r"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],"tool_choice":"required","stream":true}`,
		`{"messages":[{"role":"user","content":"w"}],"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":{"type":"function","function":{"name":"f"}},"parallel_tool_calls":false}`,
		`{"messages":[{"role":"user","content":"w"}],"tools":[{"type":"function","function":{"name":"f"}}],"include_reasoning":false,"stream":true}`,
		`{"messages":[{"role":"user","content":"w"}],"response_format":{"type":"json_schema","json_schema":{"name":"n","schema":{"type":"object"}}},"logit_bias":{"1":5},"allowed_token_ids":[1],"bad_words":["b"]}`,
		`{"messages":[{"role":"user","content":"w"}],"structured_outputs":{"json":"{}"}}`,
		`{"messages":`, `[]`, `null`, "{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\"}]}",
	)
	f.Fuzz(func(t *testing.T, body []byte) {
		fuzzBody(t, "/v1/chat/completions", body)
	})
}

// FuzzDecodeCompletion does the same for POST /v1/completions.
func FuzzDecodeCompletion(f *testing.F) {
	fuzzSeeds(f,
		`{"prompt":"hi"}`,
		`{"prompt":[1,2,3],"max_tokens":4,"n":2,"stream":true}`,
		`{"prompt":["hi"],"echo":true,"stream":true,"stream_options":{"include_usage":true}}`,
		`{"prompt":[[5]],"temperature":1,"seed":-1,"stop":"x"}`,
		`{"prompt":["a","b"]}`, `{"prompt":[-1]}`, `{"prompt":""}`,
		`{"prompt":"p","structured_outputs":{"regex":"a+"},"logit_bias":{"3":-1}}`,
		`{"prompt":"p","response_format":{"type":"json_object"},"stream":true}`,
	)
	f.Fuzz(func(t *testing.T, body []byte) {
		fuzzBody(t, "/v1/completions", body)
	})
}

// fuzzBody posts body to path on a fresh fuzz server and checks the answer.
func fuzzBody(t *testing.T, path string, body []byte) {
	s := fuzzServer(t)
	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, path, bytes.NewReader(body)))
	checkAnswer(t, rec)
	_, _ = io.Copy(io.Discard, rec.Body)
}
