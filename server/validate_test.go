package server

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/llm"
)

func TestChatBadRequests(t *testing.T) {
	t.Parallel()
	msgs := `"messages":[{"role":"user","content":"hi"}]`
	tests := []struct {
		name   string
		body   string
		status int
		typ    string
		param  string // "" means null
	}{
		{name: "malformed JSON", body: `{"messages":`},
		{name: "trailing garbage", body: `{"messages":[]} x`},
		{name: "empty body", body: ` `},
		{name: "not an object", body: `[1,2]`},
		{name: "invalid UTF-8", body: "{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}"},
		{name: "no messages", body: `{"model":"test-model"}`, param: "messages"},
		{name: "empty messages", body: `{"messages":[]}`, param: "messages"},
		{name: "messages not an array", body: `{"messages":"hi"}`, param: "messages"},
		{name: "missing role", body: `{"messages":[{"content":"hi"}]}`, param: "messages[0].role"},
		{name: "tool message without tool_call_id", body: `{"messages":[{"role":"user","content":"a"},{"role":"tool","content":"b"}]}`, param: "messages[1].tool_call_id"},
		{name: "null user content", body: `{"messages":[{"role":"user","content":null}]}`, param: "messages[0].content"},
		{name: "missing user content", body: `{"messages":[{"role":"user"}]}`, param: "messages[0].content"},
		{name: "numeric content", body: `{"messages":[{"role":"user","content":5}]}`, param: "messages[0].content"},
		{name: "image part", body: `{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}`, param: "messages[0].content"},
		{name: "text part without text", body: `{"messages":[{"role":"user","content":[{"type":"text"}]}]}`, param: "messages[0].content"},
		{name: "bad part list", body: `{"messages":[{"role":"user","content":["hi"]}]}`, param: "messages[0].content"},
		{name: "temperature high", body: `{` + msgs + `,"temperature":2.5}`, param: "temperature"},
		{name: "temperature negative", body: `{` + msgs + `,"temperature":-0.1}`, param: "temperature"},
		{name: "temperature string", body: `{` + msgs + `,"temperature":"hot"}`, param: "temperature"},
		{name: "top_p zero", body: `{` + msgs + `,"top_p":0}`, param: "top_p"},
		{name: "top_p above one", body: `{` + msgs + `,"top_p":1.01}`, param: "top_p"},
		{name: "top_k", body: `{` + msgs + `,"top_k":-2}`, param: "top_k"},
		{name: "n zero", body: `{` + msgs + `,"n":0}`, param: "n"},
		{name: "n too big", body: `{` + msgs + `,"n":17}`, param: "n"},
		{name: "n fraction", body: `{` + msgs + `,"n":1.5}`, param: "n"},
		{name: "max_tokens zero", body: `{` + msgs + `,"max_tokens":0}`, param: "max_tokens"},
		{name: "max_tokens over context", body: `{` + msgs + `,"max_tokens":4096}`, param: "max_tokens"},
		{name: "max_completion_tokens negative", body: `{` + msgs + `,"max_tokens":5,"max_completion_tokens":-1}`, param: "max_completion_tokens"},
		{name: "stop number", body: `{` + msgs + `,"stop":5}`, param: "stop"},
		{name: "stop mixed array", body: `{` + msgs + `,"stop":["a",1]}`, param: "stop"},
		{name: "stop empty string", body: `{` + msgs + `,"stop":[""]}`, param: "stop"},
		{name: "too many stops", body: `{` + msgs + `,"stop":["a"` + strings.Repeat(`,"a"`, maxStopStrings) + `]}`, param: "stop"},
		{name: "stop token id", body: `{` + msgs + `,"stop_token_ids":[-1]}`, param: "stop_token_ids"},
		{name: "seed overflow", body: `{` + msgs + `,"seed":1e30}`, param: "seed"},
		{name: "stream not bool", body: `{` + msgs + `,"stream":"yes"}`, param: "stream"},
		{name: "stream options without stream", body: `{` + msgs + `,"stream_options":{"include_usage":true}}`, param: "stream_options"},
		{name: "top_logprobs without logprobs", body: `{` + msgs + `,"top_logprobs":3}`, param: "top_logprobs"},
		{name: "top_logprobs above 20", body: `{` + msgs + `,"logprobs":true,"top_logprobs":21}`, param: "top_logprobs"},
		{name: "top_logprobs negative", body: `{` + msgs + `,"logprobs":true,"top_logprobs":-1}`, param: "top_logprobs"},
		{name: "logprobs not bool", body: `{` + msgs + `,"logprobs":2}`, param: "logprobs"},
		{name: "unknown model", body: `{"model":"gpt-4",` + msgs + `}`, status: 404, typ: "NotFoundError", param: "model"},
		{name: "min_p above one", body: `{` + msgs + `,"min_p":1.5}`, param: "min_p"},
		{name: "min_p negative", body: `{` + msgs + `,"min_p":-0.1}`, param: "min_p"},
		{name: "presence_penalty", body: `{` + msgs + `,"presence_penalty":2.1}`, param: "presence_penalty"},
		{name: "frequency_penalty", body: `{` + msgs + `,"frequency_penalty":-3}`, param: "frequency_penalty"},
		{name: "frequency_penalty string", body: `{` + msgs + `,"frequency_penalty":"x"}`, param: "frequency_penalty"},
		{name: "repetition_penalty zero", body: `{` + msgs + `,"repetition_penalty":0}`, param: "repetition_penalty"},
		{name: "repetition_penalty huge", body: `{` + msgs + `,"repetition_penalty":1e9}`, param: "repetition_penalty"},
		{name: "min_tokens negative", body: `{` + msgs + `,"min_tokens":-1}`, param: "min_tokens"},
		{name: "min_tokens over max_tokens", body: `{` + msgs + `,"max_tokens":4,"min_tokens":5}`, param: "min_tokens"},
		{name: "user not a string", body: `{` + msgs + `,"user":7}`, param: "user"},
		{name: "response_format json", body: `{` + msgs + `,"response_format":{"type":"json_object"}}`, param: "response_format"},
		{name: "beam search", body: `{` + msgs + `,"use_beam_search":true}`, param: "use_beam_search"},
		{name: "stream_options not an object", body: `{` + msgs + `,"stream":true,"stream_options":true}`, param: "stream_options"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := &fakeBackend{info: testInfo, generateFn: func(context.Context, llm.Request) (llm.TokenStream, error) {
				t.Error("Generate called for a bad request")
				return nil, llm.ErrClosed
			}}
			s := newTestServer(t, b)
			if tt.status == 0 {
				tt.status, tt.typ = http.StatusBadRequest, "BadRequestError"
			}
			rec := do(s, http.MethodPost, "/v1/chat/completions", tt.body)
			msg := requireError(t, rec, tt.status, tt.typ, tt.param)
			if tt.param == "model" {
				require.Equal(t, "The model `gpt-4` does not exist.", msg)
			}
		})
	}
}

func TestChatRequestMapping(t *testing.T) {
	t.Parallel()
	f := func(v float64) *float64 { return &v }
	seed := int64(-42)
	tests := []struct {
		name string
		body string
		want llm.Request
	}{
		{
			name: "defaults",
			body: `{"messages":[{"role":"user","content":"hi"}]}`,
			want: llm.Request{
				Messages: []llm.Message{{Role: "user", Content: "hi"}},
				Sampling: llm.SamplingParams{N: 1},
			},
		},
		{
			name: "everything",
			body: `{"model":"test-model","messages":[
					{"role":"developer","content":"be brief"},
					{"role":"system","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
					{"role":"assistant","content":null},
					{"role":"user","content":"q","name":"bob"}],
				"max_tokens":10,"max_completion_tokens":20,"temperature":0,"top_p":0.5,"top_k":-1,"n":3,
				"stop":"\n\n","stop_token_ids":[2],"seed":-42,"ignore_eos":true,"user":"u1",
				"presence_penalty":0,"logprobs":false,"tools":null,"some_future_field":{"x":1},
				"stream":true,"stream_options":{"include_usage":true}}`,
			want: llm.Request{
				Messages: []llm.Message{
					{Role: "system", Content: "be brief"},
					{Role: "system", Content: "a\nb"},
					{Role: "assistant", Content: ""},
					{Role: "user", Content: "q", Name: "bob"},
				},
				Sampling: llm.SamplingParams{
					MaxTokens: 20, Temperature: f(0), TopP: f(0.5), TopK: llm.Ptr(0), Seed: &seed,
					Stop: []string{"\n\n"}, StopTokenIDs: []int32{2}, IgnoreEOS: true, N: 3,
				},
			},
		},
		{
			name: "penalties and min_p",
			body: `{"messages":[{"role":"user","content":"hi"}],"max_tokens":8,"min_p":0.05,"presence_penalty":-2,
				"frequency_penalty":1.5,"repetition_penalty":1.1,"min_tokens":3,"logit_bias":{},"response_format":{"type":"text"}}`,
			want: llm.Request{
				Messages: []llm.Message{{Role: "user", Content: "hi"}},
				Sampling: llm.SamplingParams{MaxTokens: 8, N: 1, MinP: f(0.05), PresencePenalty: -2,
					FrequencyPenalty: 1.5, RepetitionPenalty: f(1.1), MinTokens: 3},
			},
		},
		{
			// Neutral values the client set are sent as set: they switch the model's defaults off.
			name: "neutral values stay set",
			body: `{"messages":[{"role":"user","content":"hi"}],"repetition_penalty":1,"min_tokens":0,"top_k":0,"top_p":1,"min_p":0}`,
			want: llm.Request{
				Messages: []llm.Message{{Role: "user", Content: "hi"}},
				Sampling: llm.SamplingParams{N: 1, RepetitionPenalty: f(1), TopK: llm.Ptr(0), TopP: f(1), MinP: f(0)},
			},
		},
		{
			name: "unset values stay unset",
			body: `{"messages":[{"role":"user","content":"hi"}],"top_k":null,"top_p":null}`,
			want: llm.Request{
				Messages: []llm.Message{{Role: "user", Content: "hi"}},
				Sampling: llm.SamplingParams{N: 1},
			},
		},
		{
			name: "max_tokens and stop list",
			body: `{"messages":[{"role":"user","content":"hi"}],"max_tokens":2048,"stop":["a","b"],"top_k":40,"stop":null}`,
			want: llm.Request{
				Messages: []llm.Message{{Role: "user", Content: "hi"}},
				Sampling: llm.SamplingParams{MaxTokens: 2048, TopK: llm.Ptr(40), N: 1},
			},
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
			rec := do(s, http.MethodPost, "/v1/chat/completions", tt.body)
			require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
			tt.want.ID = testID
			require.Equal(t, tt.want, got)
		})
	}
}

func TestBodyLimit(t *testing.T) {
	t.Parallel()
	body := fmt.Sprintf(`{"messages":[{"role":"user","content":%q}]}`, strings.Repeat("x", 100))
	for _, limit := range []int64{int64(len(body)) - 1, int64(len(body))} {
		t.Run(fmt.Sprint(limit), func(t *testing.T) {
			t.Parallel()
			stream := scripted(llm.Usage{}, nil, llm.Delta{FinishReason: "stop"})
			s := newTestServer(t, backendWith(stream, nil), func(c *Config) { c.MaxBodyBytes = limit })
			rec := do(s, http.MethodPost, "/v1/chat/completions", body)
			if limit < int64(len(body)) {
				requireError(t, rec, http.StatusRequestEntityTooLarge, "RequestTooLargeError", "")
			} else {
				require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
			}
		})
	}
}
