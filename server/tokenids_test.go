package server

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/llm"
)

func tokenIDDeltas() []llm.Delta {
	return []llm.Delta{
		{Index: 0, TokenIDs: []int32{11, 12}, Text: "Hi"},
		{Index: 0, TokenIDs: []int32{13}, Text: ""}, // held-back text: ids still go out
		{Index: 0, TokenIDs: []int32{14}, Text: "!", FinishReason: "stop"},
	}
}

// return_token_ids, as vLLM's: each choice carries its output token ids, streamed or not; the
// field is absent without it.
func TestReturnTokenIDs(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ path, body string }{
		{"/v1/chat/completions", hello},
		{"/v1/completions", `{"model":"test-model","prompt":"hi"`},
	} {
		s := newTestServer(t, backendWith(scripted(llm.Usage{PromptTokens: 1, CompletionTokens: 4}, nil, tokenIDDeltas()...), nil))
		rec := do(s, http.MethodPost, tc.path, tc.body+`,"return_token_ids":true}`)
		require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
		var resp struct {
			Choices []struct {
				TokenIDs []int32 `json:"token_ids"`
			} `json:"choices"`
		}
		require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &resp))
		require.Equal(t, []int32{11, 12, 13, 14}, resp.Choices[0].TokenIDs, tc.path)

		s = newTestServer(t, backendWith(scripted(llm.Usage{}, nil, tokenIDDeltas()...), nil))
		rec = do(s, http.MethodPost, tc.path, tc.body+`,"return_token_ids":true,"stream":true}`)
		require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
		var streamed []int32
		for _, line := range strings.Split(rec.Body.String(), "\n") {
			if !strings.HasPrefix(line, "data: {") {
				continue
			}
			var chunk struct {
				Choices []struct {
					TokenIDs []int32 `json:"token_ids"`
				} `json:"choices"`
			}
			require.NoError(t, json.Unmarshal([]byte(line[len("data: "):]), &chunk))
			for _, c := range chunk.Choices {
				streamed = append(streamed, c.TokenIDs...)
			}
		}
		require.Equal(t, []int32{11, 12, 13, 14}, streamed, tc.path)

		s = newTestServer(t, backendWith(scripted(llm.Usage{}, nil, tokenIDDeltas()...), nil))
		rec = do(s, http.MethodPost, tc.path, tc.body+`}`)
		require.NotContains(t, rec.Body.String(), "token_ids")
	}
}
