package server

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/llm"
)

// logprobStream is a scripted stream that also offers prompt logprobs, as engine.Stream does.
type logprobStream struct {
	*fakeStream
	positions []llm.PromptPosition
}

func (p *logprobStream) PromptLogprobs() []llm.PromptPosition { return p.positions }

// testPositions are the prompt logprobs of a three-token prompt "A", "b", "c" (ids 10, 11, 12).
var testPositions = []llm.PromptPosition{
	{Token: "A"},
	{Token: "b", Entries: []llm.PromptLogprob{{TokenID: 11, Logprob: -2.5, Rank: 3, Token: "b"},
		{TokenID: 7, Logprob: -0.5, Rank: 1, Token: "x"}}},
	{Token: "c", Entries: []llm.PromptLogprob{{TokenID: 12, Logprob: -0.25, Rank: 1, Token: "c"}}},
}

const prefill = `{"model":"test-model","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"Once"}]`

func TestChatFieldsIntoRequest(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		body string
		chat *llm.ChatOptions
		plp  *int
	}{
		{name: "defaults render as before", body: prefill + `}`},
		{name: "explicit defaults", body: prefill + `,"add_generation_prompt":true,"continue_final_message":false,"echo":false,"add_special_tokens":false}`},
		{name: "continue final message", body: prefill + `,"add_generation_prompt":false,"continue_final_message":true}`,
			chat: &llm.ChatOptions{ContinueFinalMessage: true}},
		{name: "no generation prompt", body: prefill + `,"add_generation_prompt":false}`, chat: &llm.ChatOptions{}},
		{name: "template kwargs and documents", body: prefill + `,"chat_template_kwargs":{"enable_thinking":false},"documents":[{"title":"t","text":"x"}]}`,
			chat: &llm.ChatOptions{AddGenerationPrompt: true, TemplateKwargs: map[string]json.RawMessage{"enable_thinking": json.RawMessage("false")},
				Documents: []map[string]string{{"title": "t", "text": "x"}}}},
		{name: "add special tokens", body: prefill + `,"add_special_tokens":true}`, chat: &llm.ChatOptions{AddGenerationPrompt: true, AddSpecialTokens: true}},
		{name: "prompt logprobs", body: prefill + `,"prompt_logprobs":5}`, plp: llm.Ptr(5)},
		{name: "prompt logprobs 0 streamed: not computed", body: prefill + `,"prompt_logprobs":0,"stream":true}`},
		{name: "echo asks for prompt logprobs", body: prefill + `,"echo":true,"logprobs":true,"top_logprobs":2}`, plp: llm.Ptr(2)},
		{name: "echo streamed does not", body: prefill + `,"echo":true,"stream":true}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var got llm.Request
			s := newTestServer(t, backendWith(&logprobStream{fakeStream: scripted(llm.Usage{}, nil, llm.Delta{Text: "x", FinishReason: "stop"}),
				positions: testPositions}, &got))
			rec := do(s, http.MethodPost, "/v1/chat/completions", tt.body)
			require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
			require.Equal(t, tt.chat, got.Chat)
			require.Equal(t, tt.plp, got.Sampling.PromptLogprobs)
			require.NoError(t, got.Validate())
		})
	}
}

func TestChatEchoAndPromptLogprobs(t *testing.T) {
	t.Parallel()
	wantPL := `[null,{"11":{"logprob":-2.5,"rank":3,"decoded_token":"b"},"7":{"logprob":-0.5,"rank":1,"decoded_token":"x"}},` +
		`{"12":{"logprob":-0.25,"rank":1,"decoded_token":"c"}}]`
	tests := []struct {
		name    string
		body    string
		role    string
		content string
		pl      string // "" means left out
	}{
		{name: "echo of a prefilled assistant turn", body: prefill + `,"add_generation_prompt":false,"continue_final_message":true,"echo":true}`,
			role: "assistant", content: "Once upon", pl: wantPL},
		{name: "echo after a user turn echoes nothing", body: hello + `,"echo":true}`, role: "assistant", content: " upon", pl: wantPL},
		{name: "no generation prompt: the last message's role", body: hello + `,"add_generation_prompt":false,"echo":true}`,
			role: "user", content: "hi upon", pl: wantPL},
		{name: "prompt logprobs", body: hello + `,"prompt_logprobs":1}`, role: "assistant", content: " upon", pl: wantPL},
		{name: "neither", body: hello + `}`, role: "assistant", content: " upon"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			st := &logprobStream{fakeStream: scripted(llm.Usage{PromptTokens: 3, CompletionTokens: 1}, nil,
				llm.Delta{Text: " upon", TokenIDs: []int32{5}, FinishReason: "length"}), positions: testPositions}
			s := newTestServer(t, backendWith(st, nil))
			rec := do(s, http.MethodPost, "/v1/chat/completions", tt.body)
			require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
			var resp struct {
				Choices []struct {
					Message struct {
						Role    string `json:"role"`
						Content string `json:"content"`
					} `json:"message"`
				} `json:"choices"`
				PromptLogprobs json.RawMessage `json:"prompt_logprobs"`
			}
			require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &resp))
			require.Equal(t, tt.role, resp.Choices[0].Message.Role)
			require.Equal(t, tt.content, resp.Choices[0].Message.Content)
			if tt.pl == "" {
				require.Nil(t, resp.PromptLogprobs)
			} else {
				require.JSONEq(t, tt.pl, string(resp.PromptLogprobs))
			}
		})
	}
}

func TestChatEchoStream(t *testing.T) {
	t.Parallel()
	s := newTestServer(t, backendWith(scripted(llm.Usage{}, nil, llm.Delta{Text: " upon", FinishReason: "stop"}), nil))
	rec := do(s, http.MethodPost, "/v1/chat/completions", prefill+`,"add_generation_prompt":false,"continue_final_message":true,"echo":true,"stream":true}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	head := `data: {"id":"chatcmpl-test","object":"chat.completion.chunk","created":1700000000,"model":"test-model","choices":[`
	want := head + `{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}` + "\n\n" +
		head + `{"index":0,"delta":{"content":"Once"},"logprobs":null,"finish_reason":null}]}` + "\n\n" +
		head + `{"index":0,"delta":{"content":" upon"},"logprobs":null,"finish_reason":null}]}` + "\n\n" +
		head + `{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop","stop_reason":null}],"system_fingerprint":"govllm-fake"}` + "\n\n" +
		"data: [DONE]\n\n"
	require.Equal(t, want, rec.Body.String())
}

func TestFieldsBadRequests(t *testing.T) {
	t.Parallel()
	prompt := `{"model":"test-model","prompt":"hi"`
	tests := []struct {
		name, path, body, param string
	}{
		{"both generation prompt and continue", "/v1/chat/completions", prefill + `,"continue_final_message":true}`, "continue_final_message"},
		{"both explicit", "/v1/chat/completions", prefill + `,"continue_final_message":true,"add_generation_prompt":true}`, "continue_final_message"},
		{"request chat template", "/v1/chat/completions", prefill + `,"chat_template":"{{ messages }}"}`, "chat_template"},
		{"template kwargs overriding a field", "/v1/chat/completions", prefill + `,"chat_template_kwargs":{"add_generation_prompt":false}}`, "chat_template_kwargs"},
		{"template kwargs not an object", "/v1/chat/completions", prefill + `,"chat_template_kwargs":[1]}`, "chat_template_kwargs"},
		{"documents not objects", "/v1/chat/completions", prefill + `,"documents":["x"]}`, "documents"},
		{"echo not bool", "/v1/chat/completions", prefill + `,"echo":"yes"}`, "echo"},
		{"prompt logprobs streamed", "/v1/chat/completions", prefill + `,"prompt_logprobs":1,"stream":true}`, "prompt_logprobs"},
		{"prompt logprobs above 20", "/v1/chat/completions", prefill + `,"prompt_logprobs":21}`, "prompt_logprobs"},
		{"prompt logprobs -1", "/v1/completions", prompt + `,"prompt_logprobs":-1}`, "prompt_logprobs"},
		{"prompt logprobs not an integer", "/v1/completions", prompt + `,"prompt_logprobs":"2"}`, "prompt_logprobs"},
		{"completions add_special_tokens false", "/v1/completions", prompt + `,"add_special_tokens":false}`, "add_special_tokens"},
		{"priority", "/v1/chat/completions", prefill + `,"priority":1}`, "priority"},
		{"cache_salt", "/v1/completions", prompt + `,"cache_salt":"s"}`, "cache_salt"},
		{"truncate_prompt_tokens", "/v1/chat/completions", prefill + `,"truncate_prompt_tokens":5}`, "truncate_prompt_tokens"},
		{"mm_processor_kwargs", "/v1/chat/completions", prefill + `,"mm_processor_kwargs":{"a":1}}`, "mm_processor_kwargs"},
		{"logprob_token_ids", "/v1/completions", prompt + `,"logprob_token_ids":[1]}`, "logprob_token_ids"},
		{"return_tokens_as_token_ids", "/v1/chat/completions", prefill + `,"return_tokens_as_token_ids":true}`, "return_tokens_as_token_ids"},
		{"length_penalty", "/v1/chat/completions", prefill + `,"length_penalty":0.5}`, "length_penalty"},
		{"vllm_xargs", "/v1/completions", prompt + `,"vllm_xargs":{"k":1}}`, "vllm_xargs"},
		{"thinking_token_budget", "/v1/chat/completions", prefill + `,"thinking_token_budget":10}`, "thinking_token_budget"},
		{"kv_transfer_params", "/v1/chat/completions", prefill + `,"kv_transfer_params":{}}`, "kv_transfer_params"},
		{"repetition_detection", "/v1/chat/completions", prefill + `,"repetition_detection":{"max_pattern_size":2}}`, "repetition_detection"},
		{"return_prompt_text", "/v1/chat/completions", prefill + `,"return_prompt_text":true}`, "return_prompt_text"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			s := newTestServer(t, backendWith(scripted(llm.Usage{}, nil), nil))
			rec := do(s, http.MethodPost, tt.path, tt.body)
			msg := requireError(t, rec, http.StatusBadRequest, "BadRequestError", tt.param)
			require.NotEmpty(t, msg)
		})
	}
	// vLLM's defaults of the refused fields are accepted.
	s := newTestServer(t, backendWith(scripted(llm.Usage{}, nil, llm.Delta{FinishReason: "stop"}), nil))
	rec := do(s, http.MethodPost, "/v1/chat/completions", prefill+`,"priority":0,"length_penalty":1.0,"return_tokens_as_token_ids":false,"cache_salt":null,"vllm_xargs":{}}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
}

func TestCompletionsEchoLogprobs(t *testing.T) {
	t.Parallel()
	out := []llm.Delta{{Index: 0, TokenIDs: []int32{5}, Text: "dé", FinishReason: "length",
		Logprobs: []llm.TokenLogprob{{Token: "dé", Logprob: -0.75, Top: []llm.TokenLogprob{{Token: "x", Logprob: -0.5}}}}}}
	// The echoed prompt: null first, the prompt token then the top 1 (the top 2nd entry cut).
	prompt := `"tokens":["A","b","c","dé"],"token_logprobs":[null,-2.5,-0.25,-0.75],` +
		`"top_logprobs":[null,{"b":-2.5,"x":-0.5},{"c":-0.25},{"dé":-0.75,"x":-0.5}],"text_offset":[0,1,2,3]`
	pl := `[null,{"11":{"logprob":-2.5,"rank":3,"decoded_token":"b"},"7":{"logprob":-0.5,"rank":1,"decoded_token":"x"}},` +
		`{"12":{"logprob":-0.25,"rank":1,"decoded_token":"c"}}]`

	var got llm.Request
	st := &logprobStream{fakeStream: scripted(llm.Usage{PromptTokens: 3, CompletionTokens: 1}, nil, out...), positions: testPositions}
	s := newTestServer(t, backendWith(st, &got))
	rec := do(s, http.MethodPost, "/v1/completions", `{"model":"test-model","prompt":"Abc","echo":true,"logprobs":1,"max_tokens":1}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	require.Equal(t, llm.Ptr(1), got.Sampling.PromptLogprobs)
	require.JSONEq(t, `{"id":"cmpl-test","object":"text_completion","created":1700000000,"model":"test-model",
		"choices":[{"index":0,"text":"Abcdé","logprobs":{`+prompt+`},"finish_reason":"length","stop_reason":null,
			"prompt_logprobs":`+pl+`}],
		"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4},"system_fingerprint":"govllm-fake"}`, rec.Body.String())

	// Streamed: the prompt and its logprobs lead the first chunk; no prompt_logprobs field.
	st = &logprobStream{fakeStream: scripted(llm.Usage{}, nil, out...), positions: testPositions}
	s = newTestServer(t, backendWith(st, nil))
	rec = do(s, http.MethodPost, "/v1/completions", `{"model":"test-model","prompt":"Abc","echo":true,"logprobs":1,"max_tokens":1,"stream":true}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	first := strings.SplitN(strings.TrimPrefix(rec.Body.String(), "data: "), "\n\n", 2)[0]
	require.JSONEq(t, `{"id":"cmpl-test","object":"text_completion","created":1700000000,"model":"test-model",
		"choices":[{"index":0,"text":"Abcdé","logprobs":{`+prompt+`},"finish_reason":"length","stop_reason":null}],
		"system_fingerprint":"govllm-fake"}`, first)
}

func TestCompletionsLogprobsZero(t *testing.T) {
	t.Parallel()
	out := []llm.Delta{{Index: 0, TokenIDs: []int32{5, 6}, Text: "ab", FinishReason: "length",
		Logprobs: []llm.TokenLogprob{{Token: "a", Logprob: -0.75}, {Token: "b", Logprob: -0.5}}}}
	s := newTestServer(t, backendWith(scripted(llm.Usage{}, nil, out...), nil))
	rec := do(s, http.MethodPost, "/v1/completions", `{"model":"test-model","prompt":"x","logprobs":0,"max_tokens":2}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	var resp struct {
		Choices []struct {
			Logprobs textLogprobs `json:"logprobs"`
		} `json:"choices"`
	}
	require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &resp))
	require.Equal(t, []map[string]float64{{"a": -0.75}, {"b": -0.5}}, resp.Choices[0].Logprobs.TopLogprobs)
}
