package engine

import (
	"log/slog"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/detok"
	"github.com/govllm/govllm/llm"
)

// The prompt logprobs events of a request (the bridge sends one per prefill chunk, before the
// first delta) become its positions: null first, then per prompt token its own entry first with
// the token's text as vLLM decodes it, the top ones after, each token id once.
func TestPromptLogprobsEvents(t *testing.T) {
	tok := defaultTokenizer(t)
	prompt := []int32{504, 3575, 282, 4649} // "The capital of France"
	s, _ := textStream(t, SamplingParams{PromptLogprobs: llm.Ptr(1)}, prompt)
	s.e.log = slog.New(slog.DiscardHandler)
	require.Nil(t, s.PromptLogprobs())

	// Two pieces, as a chunked prefill sends them; in the second the prompt token is the top one.
	s.e.handle(&event{kind: evPromptLogprobs, reqID: 7,
		meta: []byte(`{"token_ids":[[3575,28]],"logprobs":[[-7.5,-1.25]],"ranks":[40]}`)})
	s.e.handle(&event{kind: evPromptLogprobs, reqID: 7,
		meta: []byte(`{"token_ids":[[282,282],[4649,1345]],"logprobs":[[-0.5,-0.5],[-9999,-0.75]],"ranks":[1,2]}`)})
	got := s.PromptLogprobs()
	text := func(id int32) string { return tok.LogprobText(id, nil) }
	require.Equal(t, []llm.PromptPosition{
		{Token: tok.Decode(prompt[:1], detok.Options{})},
		{Token: text(3575), Entries: []llm.PromptLogprob{{TokenID: 3575, Logprob: -7.5, Rank: 40, Token: text(3575)},
			{TokenID: 28, Logprob: -1.25, Rank: 1, Token: text(28)}}},
		{Token: text(282), Entries: []llm.PromptLogprob{{TokenID: 282, Logprob: -0.5, Rank: 1, Token: text(282)}}},
		{Token: text(4649), Entries: []llm.PromptLogprob{{TokenID: 4649, Logprob: -9999, Rank: 2, Token: text(4649)},
			{TokenID: 1345, Logprob: -0.75, Rank: 1, Token: text(1345)}}},
	}, got)
	require.Equal(t, "The", got[0].Token)
	require.Equal(t, " capital", got[1].Token)

	// A malformed event is dropped (and logged), keeping what came before.
	s.e.handle(&event{kind: evPromptLogprobs, reqID: 7, meta: []byte(`{"token_ids":[[1]],"logprobs":[],"ranks":[1]}`)})
	require.Len(t, s.PromptLogprobs(), 4)
}
