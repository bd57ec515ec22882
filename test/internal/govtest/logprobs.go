package govtest

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// LogprobEntry is one entry of a chat completion's logprobs.content, as OpenAI shapes it.
type LogprobEntry struct {
	Token       string  `json:"token"`
	Logprob     float64 `json:"logprob"`
	Bytes       []int   `json:"bytes"`
	TopLogprobs []struct {
		Token   string  `json:"token"`
		Logprob float64 `json:"logprob"`
	} `json:"top_logprobs"`
}

// ChatLogprobs is a non-streamed chat completion with logprobs, one choice deep.
type ChatLogprobs struct {
	Choices []struct {
		Message struct {
			Content string `json:"content"`
		} `json:"message"`
		Logprobs *struct {
			Content []LogprobEntry `json:"content"`
		} `json:"logprobs"`
	} `json:"choices"`
}

// RequireGreedyLogprobs checks the logprobs of a greedy, single-choice answer with top_logprobs
// 2: n entries, each a log-probability whose token is the most likely of its top list (equal
// within delta), lists sorted, bytes matching the token, and the tokens spelling the answer
// (special tokens past ignore_eos may add entries without text). It returns the entries.
func RequireGreedyLogprobs(t testing.TB, c ChatLogprobs, n int, delta float64) []LogprobEntry {
	t.Helper()
	require.Len(t, c.Choices, 1)
	require.NotNil(t, c.Choices[0].Logprobs)
	content := c.Choices[0].Logprobs.Content
	require.Len(t, content, n)
	var joined strings.Builder
	for i, e := range content {
		require.LessOrEqual(t, e.Logprob, 0.0, "entry %d", i)
		require.Len(t, e.TopLogprobs, 2, "entry %d", i)
		require.Equal(t, e.Token, e.TopLogprobs[0].Token, "greedy: the chosen token is the most likely (entry %d)", i)
		require.InDelta(t, e.Logprob, e.TopLogprobs[0].Logprob, delta)
		require.GreaterOrEqual(t, e.TopLogprobs[0].Logprob, e.TopLogprobs[1].Logprob)
		require.Equal(t, len([]byte(e.Token)), len(e.Bytes))
		joined.WriteString(e.Token)
	}
	text := c.Choices[0].Message.Content
	require.True(t, strings.HasPrefix(joined.String(), text), "%q, %q", joined.String(), text)
	return content
}
