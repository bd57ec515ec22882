package server

import (
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/llm"
)

// logprobDeltas is a two-token answer ("Hi", "!") with one top logprob per token; the first
// delta carries a token whose text is held back (no text yet), as a detokenizer does.
func logprobDeltas() []llm.Delta {
	hi := llm.TokenLogprob{Token: "Hi", Logprob: -0.5, Bytes: []int{72, 105},
		Top: []llm.TokenLogprob{{Token: "Hi", Logprob: -0.5, Bytes: []int{72, 105}}}}
	bang := llm.TokenLogprob{Token: "!", Logprob: -1.25, Bytes: []int{33},
		Top: []llm.TokenLogprob{{Token: ".", Logprob: -1, Bytes: []int{46}}}}
	return []llm.Delta{
		{Index: 0, TokenIDs: []int32{1}, Logprobs: []llm.TokenLogprob{hi}},
		{Index: 0, TokenIDs: []int32{2}, Text: "Hi!", Logprobs: []llm.TokenLogprob{bang}, FinishReason: "stop"},
	}
}

const (
	hiContent   = `{"token":"Hi","logprob":-0.5,"bytes":[72,105],"top_logprobs":[{"token":"Hi","logprob":-0.5,"bytes":[72,105]}]}`
	bangContent = `{"token":"!","logprob":-1.25,"bytes":[33],"top_logprobs":[{"token":".","logprob":-1,"bytes":[46]}]}`
)

func TestChatLogprobsNonStream(t *testing.T) {
	t.Parallel()
	var got llm.Request
	s := newTestServer(t, backendWith(scripted(llm.Usage{PromptTokens: 3, CompletionTokens: 2}, nil, logprobDeltas()...), &got))
	rec := do(s, http.MethodPost, "/v1/chat/completions", hello+`,"logprobs":true,"top_logprobs":1}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	require.JSONEq(t, `{
		"id":"chatcmpl-test","object":"chat.completion","created":1700000000,"model":"test-model",
		"choices":[{"index":0,"message":{"role":"assistant","content":"Hi!","tool_calls":[]},
			"logprobs":{"content":[`+hiContent+`,`+bangContent+`]},"finish_reason":"stop","stop_reason":null}],
		"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5},
		"system_fingerprint":"govllm-fake"
	}`, rec.Body.String())
	require.NotNil(t, got.Sampling.Logprobs)
	require.Equal(t, 1, *got.Sampling.Logprobs)
}

func TestChatLogprobsStream(t *testing.T) {
	t.Parallel()
	s := newTestServer(t, backendWith(scripted(llm.Usage{}, nil, logprobDeltas()...), nil))
	rec := do(s, http.MethodPost, "/v1/chat/completions", hello+`,"logprobs":true,"top_logprobs":1,"stream":true}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	head := `data: {"id":"chatcmpl-test","object":"chat.completion.chunk","created":1700000000,"model":"test-model","choices":[`
	want := head + `{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}` + "\n\n" +
		head + `{"index":0,"delta":{"content":""},"logprobs":{"content":[` + hiContent + `]},"finish_reason":null}]}` + "\n\n" +
		head + `{"index":0,"delta":{"content":"Hi!"},"logprobs":{"content":[` + bangContent + `]},"finish_reason":null}]}` + "\n\n" +
		head + `{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop","stop_reason":null}],"system_fingerprint":"govllm-fake"}` + "\n\n" +
		"data: [DONE]\n\n"
	require.Equal(t, want, rec.Body.String())
}

func TestChatLogprobsDefaultTop(t *testing.T) {
	t.Parallel()
	var got llm.Request
	s := newTestServer(t, backendWith(scripted(llm.Usage{}, nil, llm.Delta{FinishReason: "stop"}), &got))
	rec := do(s, http.MethodPost, "/v1/chat/completions", hello+`,"logprobs":true}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	require.Contains(t, rec.Body.String(), `"logprobs":{"content":[]}`)
	require.Equal(t, 0, *got.Sampling.Logprobs)

	s = newTestServer(t, backendWith(scripted(llm.Usage{}, nil, llm.Delta{FinishReason: "stop"}), &got))
	rec = do(s, http.MethodPost, "/v1/chat/completions", hello+`,"logprobs":false}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	require.Contains(t, rec.Body.String(), `"logprobs":null`)
	require.Nil(t, got.Sampling.Logprobs)
}

func TestCompletionLogprobs(t *testing.T) {
	t.Parallel()
	var got llm.Request
	s := newTestServer(t, backendWith(scripted(llm.Usage{PromptTokens: 1, CompletionTokens: 2}, nil, logprobDeltas()...), &got))
	rec := do(s, http.MethodPost, "/v1/completions", `{"prompt":"a","logprobs":1}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	// As vLLM, top_logprobs holds the sampled token as well as the most likely ones.
	require.JSONEq(t, `{
		"id":"cmpl-test","object":"text_completion","created":1700000000,"model":"test-model",
		"choices":[{"index":0,"text":"Hi!","finish_reason":"stop","stop_reason":null,
			"logprobs":{"tokens":["Hi","!"],"token_logprobs":[-0.5,-1.25],"top_logprobs":[{"Hi":-0.5},{"!":-1.25,".":-1}],"text_offset":[0,2]}}],
		"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3},
		"system_fingerprint":"govllm-fake"
	}`, rec.Body.String())
	require.Equal(t, 1, *got.Sampling.Logprobs)

	s = newTestServer(t, backendWith(scripted(llm.Usage{}, nil, logprobDeltas()...), nil))
	rec = do(s, http.MethodPost, "/v1/completions", `{"prompt":"a","logprobs":1,"stream":true}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	body := rec.Body.String()
	require.Equal(t, 1, strings.Count(body, `"logprobs":{"tokens":["Hi"],"token_logprobs":[-0.5],"top_logprobs":[{"Hi":-0.5}],"text_offset":[0]}`), body)
	require.Equal(t, 1, strings.Count(body, `"logprobs":{"tokens":["!"],"token_logprobs":[-1.25],"top_logprobs":[{"!":-1.25,".":-1}],"text_offset":[2]}`), body)
}
