package llm_test

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/llm"
)

func TestValidate(t *testing.T) {
	prompt := func(sp llm.SamplingParams) llm.Request { return llm.Request{Prompt: "hi", Sampling: sp} }
	for _, tc := range []struct {
		name  string
		req   llm.Request
		param string // "" means valid
	}{
		{"plain", prompt(llm.SamplingParams{}), ""},
		{"neutral values set", prompt(llm.SamplingParams{TopK: llm.Ptr(0), TopP: llm.Ptr(1.0), MinP: llm.Ptr(0.0), RepetitionPenalty: llm.Ptr(1.0)}), ""},
		{"top_k -1 means off", prompt(llm.SamplingParams{TopK: llm.Ptr(-1)}), ""},
		{"no input", llm.Request{}, ""},
		{"two inputs", llm.Request{Prompt: "a", PromptTokenIDs: []int32{1}}, ""},
		{"n beyond the wire's 16 bits", prompt(llm.SamplingParams{N: llm.MaxChoices + 1}), "n"},
		{"negative max_tokens", prompt(llm.SamplingParams{MaxTokens: -1}), "max_tokens"},
		{"temperature", prompt(llm.SamplingParams{Temperature: llm.Ptr(2.5)}), "temperature"},
		{"top_p 0", prompt(llm.SamplingParams{TopP: llm.Ptr(0.0)}), "top_p"},
		{"top_k -2", prompt(llm.SamplingParams{TopK: llm.Ptr(-2)}), "top_k"},
		{"min_p", prompt(llm.SamplingParams{MinP: llm.Ptr(1.5)}), "min_p"},
		{"repetition_penalty 0", prompt(llm.SamplingParams{RepetitionPenalty: llm.Ptr(0.0)}), "repetition_penalty"},
		{"presence_penalty", prompt(llm.SamplingParams{PresencePenalty: 3}), "presence_penalty"},
		{"min_tokens above max_tokens", prompt(llm.SamplingParams{MaxTokens: 2, MinTokens: 3}), "min_tokens"},
		{"logprobs", prompt(llm.SamplingParams{Logprobs: llm.Ptr(21)}), "logprobs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.req.Validate()
			if tc.param == "" && tc.name != "no input" && tc.name != "two inputs" {
				require.NoError(t, err)
				return
			}
			var re *llm.RequestError
			require.ErrorAs(t, err, &re)
			require.Equal(t, 400, re.Status)
			require.Equal(t, tc.param, re.Param)
		})
	}
}

// TestSamplingWire pins what the engine's bridge reads: unset fields are absent, set ones
// present even when neutral.
func TestSamplingWire(t *testing.T) {
	b, err := json.Marshal(llm.Request{ID: "chatcmpl-1", Prompt: "hi", Sampling: llm.SamplingParams{TopK: llm.Ptr(0), MaxTokens: 4}})
	require.NoError(t, err)
	require.JSONEq(t, `{"request_id":"chatcmpl-1","prompt":"hi","sampling":{"max_tokens":4,"top_k":0}}`, string(b))

	var re llm.RequestError
	require.NoError(t, json.Unmarshal([]byte(`{"status":400,"type":"BadRequestError","param":"top_k","message":"m"}`), &re))
	require.Equal(t, llm.RequestError{Status: 400, Type: "BadRequestError", Param: "top_k", Message: "m"}, re)
}
