package agent

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/test/internal/govtest"
)

// thinkRegex makes the tiny model write a reasoning block, then an answer.
const thinkRegex = `<think>[a-z]{3,8} [a-z]{3,8}</think>[A-Z][a-z]{2,8}`

func reasoningBody(extra map[string]any) map[string]any {
	b := map[string]any{
		"messages":           []map[string]string{{"role": "user", "content": "Think, then answer."}},
		"temperature":        0,
		"max_tokens":         40,
		"structured_outputs": map[string]any{"regex": thinkRegex},
		"return_token_ids":   true,
	}
	for k, v := range extra {
		b[k] = v
	}
	return b
}

func postJSON(t *testing.T, url string, body map[string]any) *http.Response {
	t.Helper()
	data, err := json.Marshal(body)
	require.NoError(t, err)
	resp, err := http.Post(url+"/v1/chat/completions", "application/json", bytes.NewReader(data))
	require.NoError(t, err)
	t.Cleanup(func() { resp.Body.Close() })
	require.Equal(t, http.StatusOK, resp.StatusCode)
	return resp
}

type reasoningMessage struct {
	Content   *string `json:"content"`
	Reasoning *string `json:"reasoning"`
}

// TestReasoningParser checks the reasoning round trip (Go detokenizes, the bridge runs vLLM's
// qwen3 parser, Go renders message.reasoning / delta.reasoning), streamed and not, and
// include_reasoning: false.
func TestReasoningParser(t *testing.T) {
	var whole struct {
		Choices []struct {
			Message      reasoningMessage `json:"message"`
			FinishReason string           `json:"finish_reason"`
			TokenIDs     []int32          `json:"token_ids"`
		} `json:"choices"`
		Usage struct {
			CompletionTokens int `json:"completion_tokens"`
		} `json:"usage"`
	}
	require.NoError(t, json.NewDecoder(postJSON(t, reasoning.URL, reasoningBody(nil)).Body).Decode(&whole))
	c := whole.Choices[0]
	require.NotNil(t, c.Message.Reasoning)
	require.NotNil(t, c.Message.Content)
	require.Regexp(t, `^[a-z]{3,8} [a-z]{3,8}$`, *c.Message.Reasoning)
	require.Regexp(t, `^[A-Z][a-z]{2,8}$`, *c.Message.Content)
	require.Equal(t, len(c.TokenIDs), whole.Usage.CompletionTokens, "usage counts reasoning and content")

	t.Run("streamed", func(t *testing.T) {
		var reasoningText, content strings.Builder
		for _, data := range govtest.SSEData(t, postJSON(t, reasoning.URL, reasoningBody(map[string]any{"stream": true})).Body) {
			if data == "[DONE]" {
				continue
			}
			var chunk struct {
				Choices []struct {
					Delta reasoningMessage `json:"delta"`
				} `json:"choices"`
			}
			require.NoError(t, json.Unmarshal([]byte(data), &chunk), data)
			for _, ch := range chunk.Choices {
				if ch.Delta.Reasoning != nil {
					reasoningText.WriteString(*ch.Delta.Reasoning)
				}
				if ch.Delta.Content != nil {
					content.WriteString(*ch.Delta.Content)
				}
			}
		}
		require.Equal(t, *c.Message.Reasoning, reasoningText.String())
		require.Equal(t, *c.Message.Content, content.String())
	})

	t.Run("include_reasoning false", func(t *testing.T) {
		var resp struct {
			Choices []struct {
				Message reasoningMessage `json:"message"`
			} `json:"choices"`
		}
		require.NoError(t, json.NewDecoder(postJSON(t, reasoning.URL, reasoningBody(map[string]any{"include_reasoning": false})).Body).Decode(&resp))
		require.Nil(t, resp.Choices[0].Message.Reasoning)
		require.Equal(t, *c.Message.Content, *resp.Choices[0].Message.Content)
	})
}
