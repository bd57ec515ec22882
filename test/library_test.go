package test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/engine"
)

// run collects a greedy generation's token ids and text.
func run(ctx context.Context, prompt string, maxTokens int, ignoreEOS bool) ([]int32, string, error) {
	s, err := lib.Generate(ctx, engine.Request{
		Messages: []engine.Message{{Role: "user", Content: prompt}},
		Sampling: engine.SamplingParams{MaxTokens: maxTokens, Temperature: new(float64), IgnoreEOS: ignoreEOS},
	})
	if err != nil {
		return nil, "", err
	}
	defer s.Close()
	var ids []int32
	var text string
	for {
		d, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return ids, text, nil
		}
		if err != nil {
			return ids, text, err
		}
		ids = append(ids, d.TokenIDs...)
		text += d.Text
	}
}

func TestLibraryConcurrentGreedyMatchesSolo(t *testing.T) {
	// 64 concurrent greedy streams, decoded together by continuous batching, each give the
	// tokens that request gives alone: batching may round differently late in a sequence,
	// but it must never mix requests up.
	const streams, compare = 64, 16
	subjects := []string{"France", "Japan", "Brazil", "Canada", "Egypt", "Italy", "Kenya", "Peru"}
	asks := []string{"What is the capital of %s?", "Name a famous food from %s.", "Describe the flag of %s.",
		"What language is spoken in %s?", "Tell me one fact about %s.", "What is the currency of %s?",
		"Name a river in %s.", "Write a haiku about %s."}
	prompts := make([]string, streams)
	for i := range prompts {
		prompts[i] = fmt.Sprintf(asks[i%len(asks)], subjects[(i/len(asks))%len(subjects)])
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	solo := make([][]int32, streams)
	for i, p := range prompts {
		ids, _, err := run(ctx, p, compare, true)
		require.NoError(t, err)
		require.Len(t, ids, compare, "prompt %q", p)
		solo[i] = ids
	}
	together := make([][]int32, streams)
	errs := make([]error, streams)
	var wg sync.WaitGroup
	for i, p := range prompts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			together[i], _, errs[i] = run(ctx, p, compare, true)
		}()
	}
	wg.Wait()
	for i := range prompts {
		require.NoError(t, errs[i])
		require.Equal(t, solo[i], together[i], "stream %d (%q) differs when batched", i, prompts[i])
	}
}

func TestLibraryAbortOnCancel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	s, err := lib.Generate(ctx, engine.Request{
		Messages: []engine.Message{{Role: "user", Content: "Write a long story about a dragon."}},
		Sampling: engine.SamplingParams{MaxTokens: 500, Temperature: new(float64)},
	})
	require.NoError(t, err)
	for i := 0; i < 2; i++ {
		_, err := s.Recv()
		require.NoError(t, err)
	}
	cancel()
	var last error
	for last == nil {
		_, last = s.Recv()
	}
	require.ErrorIs(t, last, context.Canceled)
	require.Eventually(t, func() bool { return lib.Running() == 0 }, 10*time.Second, 20*time.Millisecond,
		"the backend confirms the abort")
	// The manager frees a cancelled request at its next step.
	require.Eventually(t, func() bool {
		st, err := lib.Stats(context.Background())
		return err == nil && st.BackendRunning == 0
	}, 5*time.Second, 20*time.Millisecond, "transformers' manager no longer holds the request")
	// The engine serves on.
	_, text, err := run(context.Background(), "What is the capital of France?", 8, false)
	require.NoError(t, err)
	require.Contains(t, text, "Paris")
}
