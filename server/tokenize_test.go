package server

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/llm"
)

// fakeTokenizer is a fakeBackend that also implements llm.Tokenizer through function fields.
type fakeTokenizer struct {
	*fakeBackend
	tokenizeFn   func(ctx context.Context, req llm.TokenizeRequest) (llm.TokenizeResult, error)
	detokenizeFn func(ctx context.Context, ids []int32) (string, error)
}

func (f *fakeTokenizer) Tokenize(ctx context.Context, req llm.TokenizeRequest) (llm.TokenizeResult, error) {
	return f.tokenizeFn(ctx, req)
}

func (f *fakeTokenizer) Detokenize(ctx context.Context, ids []int32) (string, error) {
	return f.detokenizeFn(ctx, ids)
}

// recordingTokenizer answers Tokenize with res (or err) and records the request.
func recordingTokenizer(got *llm.TokenizeRequest, res llm.TokenizeResult, err error) *fakeTokenizer {
	return &fakeTokenizer{
		fakeBackend: &fakeBackend{info: testInfo},
		tokenizeFn: func(_ context.Context, req llm.TokenizeRequest) (llm.TokenizeResult, error) {
			*got = req
			return res, err
		},
		detokenizeFn: func(context.Context, []int32) (string, error) { return "", errors.New("unused") },
	}
}

func TestTokenize(t *testing.T) {
	t.Parallel()
	user := []llm.Message{{Role: "user", Content: "hi"}}
	tests := []struct {
		name string
		body string
		res  llm.TokenizeResult
		want llm.TokenizeRequest // ID is always "tokenize-test"
		resp string
	}{
		{
			name: "prompt defaults",
			body: `{"prompt":"héllo"}`,
			res:  llm.TokenizeResult{TokenIDs: []int32{1, 2, 3}},
			want: llm.TokenizeRequest{Prompt: "héllo", AddSpecialTokens: true},
			resp: `{"count":3,"max_model_len":2048,"tokens":[1,2,3],"token_strs":null}`,
		},
		{
			name: "prompt without special tokens, with token strs, model named",
			body: `{"model":"test-model","prompt":"hi","add_special_tokens":false,"return_token_strs":true}`,
			res:  llm.TokenizeResult{TokenIDs: []int32{7}, TokenStrs: []string{"Ġhi"}},
			want: llm.TokenizeRequest{Prompt: "hi", ReturnTokenStrs: true},
			resp: `{"count":1,"max_model_len":2048,"tokens":[7],"token_strs":["Ġhi"]}`,
		},
		{
			name: "messages defaults",
			body: `{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}`,
			res:  llm.TokenizeResult{TokenIDs: []int32{}},
			want: llm.TokenizeRequest{Messages: user, AddGenerationPrompt: true},
			resp: `{"count":0,"max_model_len":2048,"tokens":[],"token_strs":null}`,
		},
		{
			name: "messages continued, special tokens, template kwargs, tools",
			body: `{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"Hel"}],` +
				`"continue_final_message":true,"add_special_tokens":true,"chat_template_kwargs":{"enable_thinking":false},` +
				`"tools":[{"type":"function","function":{"name":"f", "parameters":{"type":"object"}}}]}`,
			res: llm.TokenizeResult{TokenIDs: []int32{5, 6}},
			want: llm.TokenizeRequest{
				Messages:             append(append([]llm.Message{}, user...), llm.Message{Role: "assistant", Content: "Hel"}),
				ContinueFinalMessage: true, AddSpecialTokens: true,
				ChatTemplateKwargs: map[string]any{"enable_thinking": false},
				Tools:              json.RawMessage(`[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]`),
			},
			resp: `{"count":2,"max_model_len":2048,"tokens":[5,6],"token_strs":null}`,
		},
		{
			name: "generation prompt off, empty template kwargs",
			body: `{"messages":[{"role":"user","content":"hi"}],"add_generation_prompt":false,"chat_template_kwargs":{}}`,
			res:  llm.TokenizeResult{TokenIDs: []int32{1}},
			want: llm.TokenizeRequest{Messages: user},
			resp: `{"count":1,"max_model_len":2048,"tokens":[1],"token_strs":null}`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var got llm.TokenizeRequest
			s := newTestServer(t, recordingTokenizer(&got, tt.res, nil))
			rec := do(s, http.MethodPost, "/tokenize", tt.body)
			require.Equal(t, http.StatusOK, rec.Code, "body: %s", rec.Body)
			require.Equal(t, "application/json", rec.Header().Get("Content-Type"))
			require.JSONEq(t, tt.resp, rec.Body.String())
			want := tt.want
			want.ID = "tokenize-test"
			require.Equal(t, want, got)
		})
	}
}

func TestTokenizeErrors(t *testing.T) {
	t.Parallel()
	const msgs = `"messages":[{"role":"user","content":"hi"}]`
	tests := []struct {
		name       string
		body       string
		backendErr error
		status     int
		typ        string
		param      string
	}{
		{"neither", `{}`, nil, 400, "BadRequestError", "prompt"},
		{"both", `{"prompt":"x",` + msgs + `}`, nil, 400, "BadRequestError", "messages"},
		{"empty prompt", `{"prompt":""}`, nil, 400, "BadRequestError", "prompt"},
		{"prompt not a string", `{"prompt":5}`, nil, 400, "BadRequestError", "prompt"},
		{"prompt array", `{"prompt":["a"]}`, nil, 400, "BadRequestError", "prompt"},
		{"empty messages", `{"messages":[]}`, nil, 400, "BadRequestError", "messages"},
		{"messages not an array", `{"messages":"hi"}`, nil, 400, "BadRequestError", "messages"},
		{"bad role", `{"messages":[{"role":"robot","content":"hi"}]}`, nil, 400, "BadRequestError", "messages[0].role"},
		{"generation prompt on a prompt", `{"prompt":"x","add_generation_prompt":true}`, nil, 400, "BadRequestError", "add_generation_prompt"},
		{"continue on a prompt", `{"prompt":"x","continue_final_message":false}`, nil, 400, "BadRequestError", "continue_final_message"},
		{"tools on a prompt", `{"prompt":"x","tools":[]}`, nil, 400, "BadRequestError", "tools"},
		{"template kwargs on a prompt", `{"prompt":"x","chat_template_kwargs":{}}`, nil, 400, "BadRequestError", "chat_template_kwargs"},
		{"both generation and continue", `{` + msgs + `,"add_generation_prompt":true,"continue_final_message":true}`, nil, 400, "BadRequestError", "continue_final_message"},
		{"template kwargs not an object", `{` + msgs + `,"chat_template_kwargs":[1]}`, nil, 400, "BadRequestError", "chat_template_kwargs"},
		{"template kwargs reserved", `{` + msgs + `,"chat_template_kwargs":{"tokenize":true}}`, nil, 400, "BadRequestError", "chat_template_kwargs"},
		{"bad tools", `{` + msgs + `,"tools":[{"type":"function"}]}`, nil, 400, "BadRequestError", "tools[0].function"},
		{"chat template", `{` + msgs + `,"chat_template":"{{ x }}"}`, nil, 400, "BadRequestError", "chat_template"},
		{"media io kwargs", `{` + msgs + `,"media_io_kwargs":{}}`, nil, 400, "BadRequestError", "media_io_kwargs"},
		{"mm processor kwargs", `{"prompt":"x","mm_processor_kwargs":{}}`, nil, 400, "BadRequestError", "mm_processor_kwargs"},
		{"token strs not a boolean", `{"prompt":"x","return_token_strs":"yes"}`, nil, 400, "BadRequestError", "return_token_strs"},
		{"special tokens not a boolean", `{"prompt":"x","add_special_tokens":1}`, nil, 400, "BadRequestError", "add_special_tokens"},
		{"wrong model", `{"model":"other","prompt":"x"}`, nil, 404, "NotFoundError", "model"},
		{"not JSON", `{"prompt":`, nil, 400, "BadRequestError", ""},
		{"backend refuses", `{` + msgs + `}`,
			&llm.RequestError{Status: 400, Type: "BadRequestError", Param: "messages", Message: "chat template error: boom"},
			400, "BadRequestError", "messages"},
		{"backend has no tokenizer", `{"prompt":"x"}`,
			&llm.RequestError{Status: 501, Type: "NotImplementedError", Message: "the fake backend has no tokenizer"},
			501, "NotImplementedError", ""},
		{"backend fault", `{"prompt":"x"}`, errors.New("bridge exploded"), 500, "InternalServerError", ""},
		{"engine dead", `{"prompt":"x"}`, llm.ErrEngineDead, 503, "ServiceUnavailableError", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var got llm.TokenizeRequest
			b := recordingTokenizer(&got, llm.TokenizeResult{TokenIDs: []int32{1}}, tt.backendErr)
			s := newTestServer(t, b)
			rec := do(s, http.MethodPost, "/tokenize", tt.body)
			requireError(t, rec, tt.status, tt.typ, tt.param)
			require.Equal(t, "test", rec.Header().Get(requestIDHeader))
			if tt.backendErr == nil {
				require.Empty(t, got.ID, "the backend must not be called")
			}
		})
	}
}

func TestTokenizeTokenStrsMismatch(t *testing.T) {
	t.Parallel()
	var got llm.TokenizeRequest
	s := newTestServer(t, recordingTokenizer(&got, llm.TokenizeResult{TokenIDs: []int32{1, 2}, TokenStrs: []string{"a"}}, nil))
	rec := do(s, http.MethodPost, "/tokenize", `{"prompt":"x","return_token_strs":true}`)
	requireError(t, rec, 500, "InternalServerError", "")
}

func TestDetokenize(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		body       string
		backendErr error
		status     int
		param      string
		wantIDs    []int32
	}{
		{name: "ok", body: `{"tokens":[104,2147483647,0]}`, status: 200, wantIDs: []int32{104, 2147483647, 0}},
		{name: "ok with model", body: `{"model":"test-model","tokens":[1]}`, status: 200, wantIDs: []int32{1}},
		{name: "missing", body: `{}`, status: 400, param: "tokens"},
		{name: "null", body: `{"tokens":null}`, status: 400, param: "tokens"},
		{name: "empty", body: `{"tokens":[]}`, status: 400, param: "tokens"},
		{name: "negative", body: `{"tokens":[1,-1]}`, status: 400, param: "tokens"},
		{name: "too large", body: `{"tokens":[2147483648]}`, status: 400, param: "tokens"},
		{name: "not integers", body: `{"tokens":[1.5]}`, status: 400, param: "tokens"},
		{name: "strings", body: `{"tokens":["a"]}`, status: 400, param: "tokens"},
		{name: "not an array", body: `{"tokens":3}`, status: 400, param: "tokens"},
		{name: "wrong model", body: `{"model":"x","tokens":[1]}`, status: 404, param: "model"},
		{name: "out of vocabulary", body: `{"tokens":[99999]}`, status: 400, param: "tokens", wantIDs: []int32{99999},
			backendErr: &llm.RequestError{Status: 400, Type: "BadRequestError", Param: "tokens", Message: "Token id 99999 is out of vocabulary"}},
		{name: "fault", body: `{"tokens":[1]}`, status: 500, wantIDs: []int32{1}, backendErr: errors.New("boom")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var got []int32
			b := &fakeTokenizer{fakeBackend: &fakeBackend{info: testInfo},
				detokenizeFn: func(_ context.Context, ids []int32) (string, error) {
					got = ids
					return "héllo wörld 你好 🎉", tt.backendErr
				}}
			s := newTestServer(t, b)
			rec := do(s, http.MethodPost, "/detokenize", tt.body)
			require.Equal(t, tt.wantIDs, got)
			if tt.status == 200 {
				require.Equal(t, 200, rec.Code, "body: %s", rec.Body)
				require.JSONEq(t, `{"prompt":"héllo wörld 你好 🎉"}`, rec.Body.String())
				return
			}
			requireError(t, rec, tt.status, errorType(tt.status), tt.param)
		})
	}
}

// TestTokenizeNotImplemented: a backend that is not an llm.Tokenizer gets 501 on both routes,
// after the request itself was validated.
func TestTokenizeNotImplemented(t *testing.T) {
	t.Parallel()
	s := newTestServer(t, &fakeBackend{info: testInfo})
	requireError(t, do(s, http.MethodPost, "/tokenize", `{"prompt":"x"}`), 501, "NotImplementedError", "")
	requireError(t, do(s, http.MethodPost, "/detokenize", `{"tokens":[1]}`), 501, "NotImplementedError", "")
	requireError(t, do(s, http.MethodPost, "/tokenize", `{}`), 400, "BadRequestError", "prompt")
	requireError(t, do(s, http.MethodGet, "/tokenize", ""), 405, "MethodNotAllowedError", "")
}

// TestTokenizeClientGone: a client that leaves while the backend tokenizes gets no answer and
// the handler returns.
func TestTokenizeClientGone(t *testing.T) {
	t.Parallel()
	entered := make(chan struct{})
	b := &fakeTokenizer{fakeBackend: &fakeBackend{info: testInfo},
		tokenizeFn: func(ctx context.Context, _ llm.TokenizeRequest) (llm.TokenizeResult, error) {
			close(entered)
			<-ctx.Done()
			return llm.TokenizeResult{}, ctx.Err()
		}}
	s := newTestServer(t, b)
	ctx, cancel := context.WithCancel(context.Background())
	req := newRequest(http.MethodPost, "/tokenize", `{"prompt":"x"}`).WithContext(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		rec := serve(s, req)
		require.Empty(t, rec.Body.String())
	}()
	<-entered
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the handler did not return after the client left")
	}
}

// TestTokenizeUnauthenticated: as in vLLM, only /v1 routes need the API key.
func TestTokenizeUnauthenticated(t *testing.T) {
	t.Parallel()
	var got llm.TokenizeRequest
	s := newTestServer(t, recordingTokenizer(&got, llm.TokenizeResult{TokenIDs: []int32{1}}, nil),
		func(c *Config) { c.APIKey = "sk-secret" })
	rec := do(s, http.MethodPost, "/tokenize", `{"prompt":"x"}`)
	require.Equal(t, 200, rec.Code, "body: %s", rec.Body)
	requireError(t, do(s, http.MethodGet, "/v1/models", ""), 401, "AuthenticationError", "")
}
