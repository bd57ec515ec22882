package vllm_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/test/internal/govtest"
)

// TestReadmeQuickStart sends the README's quick-start curl, as written there, to a server on
// make run's defaults and checks the answer the README documents, chunk by chunk.
func TestReadmeQuickStart(t *testing.T) {
	if len(deviceArgs) > 0 {
		t.Skip("the quick start documents the CPU defaults")
	}
	readme, err := os.ReadFile(filepath.Join(govtest.RepoRoot(), "README.md"))
	require.NoError(t, err)
	m := regexp.MustCompile(`(?s)curl -N http://127\.0\.0\.1:8000(/v1/chat/completions) -H 'Content-Type: application/json' -d '(\{.*?\})'`).FindSubmatch(readme)
	require.NotNil(t, m, "the README's quick start has the curl example")
	var body map[string]any
	require.NoError(t, json.Unmarshal(m[2], &body), "the README's request body is JSON")
	doc := regexp.MustCompile("answers `([^`]+)`").FindSubmatch(readme)
	require.NotNil(t, doc, "the README documents the answer")

	resp, err := http.Post(srv.URL+string(m[1]), "application/json", bytes.NewReader(m[2]))
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	lines := govtest.SSEData(t, resp.Body)
	var pieces []string
	var text, finish string
	for i, line := range lines[:len(lines)-1] {
		var c struct {
			Choices []struct {
				Delta struct {
					Role    string  `json:"role"`
					Content *string `json:"content"`
				} `json:"delta"`
				FinishReason *string `json:"finish_reason"`
			} `json:"choices"`
		}
		require.NoError(t, json.Unmarshal([]byte(line), &c))
		require.Len(t, c.Choices, 1)
		ch := c.Choices[0]
		if i == 0 {
			require.Equal(t, "assistant", ch.Delta.Role, "the role chunk comes first")
			require.Equal(t, "", *ch.Delta.Content)
			continue
		}
		if ch.FinishReason != nil {
			finish = *ch.FinishReason
			continue
		}
		pieces = append(pieces, *ch.Delta.Content)
		text += *ch.Delta.Content
	}
	require.Equal(t, "[DONE]", lines[len(lines)-1])
	require.Equal(t, "stop", finish)
	require.Equal(t, string(doc[1]), text, "the README's documented answer")
	require.Equal(t, []string{"The", " capital", " of", " France", " is", " Paris", "."}, pieces, "one chunk per token")
}
