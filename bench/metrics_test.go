package bench

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestDistribution(t *testing.T) {
	for _, tc := range []struct {
		name string
		xs   []float64
		want Dist
	}{
		{"none", nil, Dist{}},
		{"one", []float64{0.25}, Dist{0.25, 0.25, 0, 0.25, 0.25, 0.25}},
		// numpy: mean 5.5, median 5.5, std 2.8722813, percentile 50/90/99: 5.5, 9.1, 9.91.
		{"one to ten, shuffled", []float64{7, 1, 10, 3, 5, 2, 9, 4, 8, 6}, Dist{5.5, 5.5, 2.8722813232690143, 5.5, 9.1, 9.91}},
		// numpy: [1, 2, 4, 100]: mean 26.75, median 3, std 42.3047, p90 71.2, p99 97.12.
		{"outlier", []float64{100, 1, 4, 2}, Dist{26.75, 3, 42.30469832063574, 3, 71.2, 97.12}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Distribution(tc.xs)
			require.InDelta(t, tc.want.Mean, got.Mean, 1e-6)
			require.InDelta(t, tc.want.Median, got.Median, 1e-6)
			require.InDelta(t, tc.want.Std, got.Std, 1e-6)
			require.InDelta(t, tc.want.P50, got.P50, 1e-6)
			require.InDelta(t, tc.want.P90, got.P90, 1e-6)
			require.InDelta(t, tc.want.P99, got.P99, 1e-6)
		})
	}
	xs := []float64{3, 1, 2}
	Distribution(xs)
	require.Equal(t, []float64{3, 1, 2}, xs, "the samples are not sorted in place")
}

func TestSummarize(t *testing.T) {
	results := []Result{
		// Streamed, 5 tokens: TTFT 0.1, four gaps of 0.05, E2EL 0.3 → TPOT 0.05.
		{Stream: true, Success: true, StartTime: 0, TTFT: 0.1, ITL: []float64{0.05, 0.05, 0.05, 0.05}, E2EL: 0.3,
			PromptTokens: 10, OutputTokens: 5, TPOT: 0.05, TokensPerS: 5 / 0.3, Chunks: 7, ContentChunks: 5, FinishReason: "length"},
		// Streamed, 1 token: no TPOT, no ITL.
		{Stream: true, Success: true, StartTime: 0.5, TTFT: 0.2, ITL: []float64{}, E2EL: 0.2,
			PromptTokens: 20, OutputTokens: 1, TokensPerS: 5, Chunks: 3, ContentChunks: 1, FinishReason: "stop"},
		// Unstreamed: counts in E2EL and throughput only.
		{Stream: false, Success: true, StartTime: 1, E2EL: 0.5, PromptTokens: 30, OutputTokens: 10, TokensPerS: 20, FinishReason: "length"},
		// Failed: in failed and errors only.
		{Stream: true, Success: false, StartTime: 1.2, Error: "HTTP 500: boom", E2EL: 9, OutputTokens: 99, Chunks: 2, ContentChunks: 1},
	}
	s := Summarize(results, 2)
	require.Equal(t, 3, s.Completed)
	require.Equal(t, 1, s.Failed)
	require.Equal(t, 60, s.TotalInputTokens)
	require.Equal(t, 16, s.TotalOutputTokens)
	require.InDelta(t, 1.5, s.RequestThroughput, 1e-9)
	require.InDelta(t, 8, s.OutputThroughput, 1e-9)
	require.InDelta(t, 38, s.TotalTokenThroughput, 1e-9)
	require.InDelta(t, 150, s.MeanTTFTMs, 1e-9, "TTFT over the streamed requests")
	require.InDelta(t, 50, s.MeanTPOTMs, 1e-9, "TPOT over streamed requests with 2 tokens or more")
	require.InDelta(t, 50, s.P99ITLMs, 1e-9)
	require.InDelta(t, 1000.0/3, s.MeanE2ELMs, 1e-9)
	require.InDelta(t, 300, s.MedianE2ELMs, 1e-9)
	require.InDelta(t, (5/0.3+5+20)/3, s.MeanTokensPerS, 1e-9)
	require.Equal(t, 12, s.TotalChunks)
	require.Equal(t, 7, s.TotalContentChunks)
	require.Equal(t, map[string]int{"length": 2, "stop": 1}, s.FinishReasons)
	require.Equal(t, map[string]int{"HTTP 500: boom": 1}, s.Errors)
	// Second 0 holds the first request's five tokens and the second's one; the first two
	// requests are active in second 0, the third in second 1.
	require.InDelta(t, 6, s.MaxOutputTokensPerS, 1e-9)
	require.Equal(t, 2, s.MaxConcurrentRequests)

	empty := Summarize(nil, 0)
	require.Zero(t, empty.Completed)
	require.Zero(t, empty.RequestThroughput)
	require.NotNil(t, empty.FinishReasons)
}
