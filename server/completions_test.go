package server

import (
	"context"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/llm"
)

func TestCompletionRequestMapping(t *testing.T) {
	t.Parallel()
	temp := 0.5
	seed := int64(3)
	tests := []struct {
		name string
		body string
		want llm.Request
	}{
		{
			name: "string prompt, default max_tokens",
			body: `{"model":"test-model","prompt":"Once upon"}`,
			want: llm.Request{Prompt: "Once upon", Sampling: llm.SamplingParams{MaxTokens: 16, N: 1}},
		},
		{
			name: "token ids",
			body: `{"prompt":[1,2,3],"max_tokens":5}`,
			want: llm.Request{PromptTokenIDs: []int32{1, 2, 3}, Sampling: llm.SamplingParams{MaxTokens: 5, N: 1}},
		},
		{
			name: "one string in an array",
			body: `{"prompt":["hi"]}`,
			want: llm.Request{Prompt: "hi", Sampling: llm.SamplingParams{MaxTokens: 16, N: 1}},
		},
		{
			name: "one token list in an array",
			body: `{"prompt":[[7,8]]}`,
			want: llm.Request{PromptTokenIDs: []int32{7, 8}, Sampling: llm.SamplingParams{MaxTokens: 16, N: 1}},
		},
		{
			name: "sampling fields",
			body: `{"prompt":"p","max_tokens":9,"temperature":0.5,"n":2,"stop":["x"],"seed":3,"min_p":0.1,
				"presence_penalty":0.5,"frequency_penalty":0.25,"repetition_penalty":1.2,"min_tokens":2,"user":"u",
				"echo":true,"best_of":2,"suffix":"","logprobs":null,"stream":true,"stream_options":{"include_usage":true}}`,
			want: llm.Request{Prompt: "p", Sampling: llm.SamplingParams{
				MaxTokens: 9, Temperature: &temp, N: 2, Stop: []string{"x"}, Seed: &seed, MinP: llm.Ptr(0.1),
				PresencePenalty: 0.5, FrequencyPenalty: 0.25, RepetitionPenalty: llm.Ptr(1.2), MinTokens: 2,
			}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var got llm.Request
			var deltas []llm.Delta
			for i := range tt.want.Sampling.N {
				deltas = append(deltas, llm.Delta{Index: i, FinishReason: "stop"})
			}
			s := newTestServer(t, backendWith(scripted(llm.Usage{}, nil, deltas...), &got))
			rec := do(s, http.MethodPost, "/v1/completions", tt.body)
			require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
			tt.want.ID = "cmpl-test"
			require.Equal(t, tt.want, got)
		})
	}
}

func TestCompletionBadRequests(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, body, param string
		status            int
	}{
		{name: "no prompt", body: `{"max_tokens":5}`, param: "prompt"},
		{name: "null prompt", body: `{"prompt":null}`, param: "prompt"},
		{name: "empty prompt", body: `{"prompt":""}`, param: "prompt"},
		{name: "empty array", body: `{"prompt":[]}`, param: "prompt"},
		{name: "numeric prompt", body: `{"prompt":5}`, param: "prompt"},
		{name: "object prompt", body: `{"prompt":{"a":1}}`, param: "prompt"},
		{name: "prompts of mixed kinds", body: `{"prompt":["a",[2]]}`, param: "prompt"},
		{name: "token lists then a string", body: `{"prompt":[[1],"b"]}`, param: "prompt"},
		{name: "a token id after token lists", body: `{"prompt":[[1],2]}`, param: "prompt"},
		{name: "empty string in a list", body: `{"prompt":["a",""]}`, param: "prompt"},
		{name: "empty token list in a list", body: `{"prompt":[[1],[]]}`, param: "prompt"},
		{name: "non-int id in a list", body: `{"prompt":[[1],[2.5]]}`, param: "prompt"},
		{name: "string id in a list", body: `{"prompt":[[1],["3"]]}`, param: "prompt"},
		{name: "null in a list", body: `{"prompt":["a",null]}`, param: "prompt"},
		{name: "too many prompts", body: `{"prompt":[` + strings.Repeat(`"a",`, maxPrompts) + `"a"]}`, param: "prompt"},
		{name: "too many choices", body: `{"prompt":[` + strings.Repeat(`"a",`, 31) + `"a"],"n":9}`, param: "prompt"},
		{name: "token prompt over the context", body: `{"prompt":[[1],[` + strings.Repeat(`1,`, 2040) + `1]],"max_tokens":8}`, param: "prompt"},
		{name: "echo with token ids in a list", body: `{"prompt":["a",[1,2]],"echo":true}`, param: "prompt"},
		{name: "echo with token-id prompts, no tokenizer", body: `{"prompt":[[1],[1,2]],"echo":true}`, param: "echo"},
		{name: "negative token", body: `{"prompt":[1,-2]}`, param: "prompt"},
		{name: "fractional token", body: `{"prompt":[1.5]}`, param: "prompt"},
		{name: "huge token", body: `{"prompt":[1e12]}`, param: "prompt"},
		{name: "mixed array", body: `{"prompt":[1,"a"]}`, param: "prompt"},
		{name: "nested too deep", body: `{"prompt":[[[1]]]}`, param: "prompt"},
		{name: "echo with token ids", body: `{"prompt":[1,2],"echo":true}`, param: "echo"},
		{name: "max_tokens zero", body: `{"prompt":"a","max_tokens":0}`, param: "max_tokens"},
		{name: "max_tokens over context", body: `{"prompt":"a","max_tokens":100000}`, param: "max_tokens"},
		{name: "logprobs above 20", body: `{"prompt":"a","logprobs":21}`, param: "logprobs"},
		{name: "logprobs negative", body: `{"prompt":"a","logprobs":-1}`, param: "logprobs"},
		{name: "suffix", body: `{"prompt":"a","suffix":"end"}`, param: "suffix"},
		{name: "best_of", body: `{"prompt":"a","best_of":3}`, param: "best_of"},
		{name: "temperature", body: `{"prompt":"a","temperature":9}`, param: "temperature"},
		{name: "echo not bool", body: `{"prompt":"a","echo":"yes"}`, param: "echo"},
		{name: "unknown model", body: `{"prompt":"a","model":"nope"}`, param: "model", status: http.StatusNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := &fakeBackend{info: testInfo, generateFn: func(context.Context, llm.Request) (llm.TokenStream, error) {
				t.Error("Generate called for a bad request")
				return nil, llm.ErrClosed
			}}
			s := newTestServer(t, b)
			status, typ := http.StatusBadRequest, "BadRequestError"
			if tt.status == http.StatusNotFound {
				status, typ = tt.status, "NotFoundError"
			}
			requireError(t, do(s, http.MethodPost, "/v1/completions", tt.body), status, typ, tt.param)
		})
	}
}

// textChunkEvent is a streamed text_completion event as the server must write it.
func textChunkEvent(index int, text, finish, extra string) string {
	f := "null"
	if finish != "" {
		f = `"` + finish + `"`
	}
	return `data: {"id":"cmpl-test","object":"text_completion","created":1700000000,"model":"test-model","choices":[{"index":` +
		string(rune('0'+index)) + `,"text":"` + text + `","logprobs":null,"finish_reason":` + f + `,"stop_reason":null}]` + extra + "}\n\n"
}

func TestCompletionStreamBytes(t *testing.T) {
	t.Parallel()
	u := llm.Usage{PromptTokens: 2, CompletionTokens: 3}
	fp := `,"system_fingerprint":"govllm-fake"`
	tests := []struct {
		name   string
		body   string
		deltas []llm.Delta
		want   []string
	}{
		{
			name: "usage",
			body: `{"prompt":"hi","stream":true,"stream_options":{"include_usage":true}}`,
			deltas: []llm.Delta{
				{Text: "A", TokenIDs: []int32{1}},
				{TokenIDs: []int32{2}}, // no text yet: skipped
				{Text: "b", TokenIDs: []int32{3}, FinishReason: "length"},
			},
			want: []string{
				textChunkEvent(0, "A", "", ""),
				textChunkEvent(0, "b", "length", ""),
				`data: {"id":"cmpl-test","object":"text_completion","created":1700000000,"model":"test-model","choices":[],` +
					`"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}` + fp + "}\n\n",
				doneEvent,
			},
		},
		{
			name: "echo, n=2, finish alone",
			body: `{"prompt":"hi","stream":true,"echo":true,"n":2}`,
			deltas: []llm.Delta{
				{Index: 1, Text: "x"},
				{Index: 0, Text: "y"},
				{Index: 0, FinishReason: "stop"},
				{Index: 1, Text: "z", FinishReason: "stop"},
			},
			want: []string{
				textChunkEvent(1, "hix", "", ""),
				textChunkEvent(0, "hiy", "", ""),
				textChunkEvent(0, "", "stop", fp),
				textChunkEvent(1, "z", "stop", fp),
				doneEvent,
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			s := newTestServer(t, backendWith(scripted(u, nil, tt.deltas...), nil))
			rec := do(s, http.MethodPost, "/v1/completions", tt.body)
			require.Equal(t, http.StatusOK, rec.Code)
			require.Equal(t, "text/event-stream", rec.Header().Get("Content-Type"))
			require.Equal(t, strings.Join(tt.want, ""), rec.Body.String())
		})
	}
}

func TestCompletionNonStream(t *testing.T) {
	t.Parallel()
	u := llm.Usage{PromptTokens: 2, CompletionTokens: 4}
	stream := scripted(u, nil,
		llm.Delta{Index: 0, Text: " a"},
		llm.Delta{Index: 1, Text: " b", FinishReason: "length"},
		llm.Delta{Index: 0, Text: " c", FinishReason: "stop"},
	)
	s := newTestServer(t, backendWith(stream, nil))
	rec := do(s, http.MethodPost, "/v1/completions", `{"prompt":"hi","n":2,"echo":true}`)
	require.Equal(t, http.StatusOK, rec.Code)
	require.Equal(t, "application/json", rec.Header().Get("Content-Type"))
	require.JSONEq(t, `{"id":"cmpl-test","object":"text_completion","created":1700000000,"model":"test-model",
		"choices":[
			{"index":0,"text":"hi a c","logprobs":null,"finish_reason":"stop","stop_reason":null},
			{"index":1,"text":"hi b","logprobs":null,"finish_reason":"length","stop_reason":null}],
		"usage":{"prompt_tokens":2,"completion_tokens":4,"total_tokens":6},"system_fingerprint":"govllm-fake"}`, rec.Body.String())
	require.True(t, stream.isClosed())
}
