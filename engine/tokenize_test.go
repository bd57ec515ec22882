package engine_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/engine"
	"github.com/govllm/govllm/llm"
)

// The scripted backend's tokenizer has UTF-8 bytes for ids (test/backends/scripted.py).

const utf8Text = "héllo wörld 你好 🎉"

func TestTokenizeRoundTrip(t *testing.T) {
	ctx := t.Context()
	res, err := shared.Tokenize(ctx, llm.TokenizeRequest{Prompt: utf8Text, AddSpecialTokens: true, ReturnTokenStrs: true})
	require.NoError(t, err)
	want := make([]int32, 0, len(utf8Text))
	for _, b := range []byte(utf8Text) {
		want = append(want, int32(b))
	}
	require.Equal(t, want, res.TokenIDs)
	require.Len(t, res.TokenStrs, len(want))
	require.Equal(t, "h", res.TokenStrs[0])
	text, err := shared.Detokenize(ctx, res.TokenIDs)
	require.NoError(t, err)
	require.Equal(t, utf8Text, text)

	// Messages go through the backend's chat rendering (the scripted one: the last content).
	res, err = shared.Tokenize(ctx, llm.TokenizeRequest{Messages: []llm.Message{{Role: "user", Content: "hi"}},
		AddGenerationPrompt: true})
	require.NoError(t, err)
	require.Equal(t, []int32{'h', 'i'}, res.TokenIDs)
	require.Nil(t, res.TokenStrs)
}

func TestTokenizeErrors(t *testing.T) {
	ctx := t.Context()
	_, err := shared.Detokenize(ctx, []int32{'a', 300})
	var re *llm.RequestError
	require.ErrorAs(t, err, &re)
	require.Equal(t, 400, re.Status)
	require.Equal(t, "tokens", re.Param)
	require.Contains(t, re.Message, "300 is out of vocabulary")

	for _, req := range []llm.TokenizeRequest{{}, {Prompt: "x", Messages: []llm.Message{{Role: "user", Content: "y"}}}} {
		_, err = shared.Tokenize(ctx, req)
		require.ErrorAs(t, err, &re)
		require.Equal(t, 400, re.Status)
	}
	require.Zero(t, engine.TokenizeWaiting(shared))
}

// TestTokenizeCancel: a caller whose context ends stops waiting at once and leaves no waiter;
// the bridge's late answer is dropped, not handed to the next caller.
func TestTokenizeCancel(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := shared.Tokenize(ctx, llm.TokenizeRequest{Prompt: "slowtok:1500"})
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.Less(t, time.Since(start), time.Second)
	require.Zero(t, engine.TokenizeWaiting(shared))

	_, err = shared.Detokenize(ctx, []int32{1}) // already over: not even sent
	require.ErrorIs(t, err, context.DeadlineExceeded)

	res, err := shared.Tokenize(t.Context(), llm.TokenizeRequest{Prompt: "next"})
	require.NoError(t, err)
	require.Equal(t, []int32{'n', 'e', 'x', 't'}, res.TokenIDs)
	require.Zero(t, engine.TokenizeWaiting(shared))
}

func TestTokenizeConcurrent(t *testing.T) {
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for i := range 32 {
		wg.Go(func() {
			prompt := fmt.Sprintf("prompt %d", i)
			res, err := shared.Tokenize(t.Context(), llm.TokenizeRequest{Prompt: prompt})
			if err == nil && len(res.TokenIDs) != len(prompt) {
				err = fmt.Errorf("%q: got %d ids", prompt, len(res.TokenIDs))
			}
			if err == nil {
				var text string
				text, err = shared.Detokenize(t.Context(), res.TokenIDs)
				if err == nil && text != prompt {
					err = fmt.Errorf("round trip of %q gave %q", prompt, text)
				}
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	var all []error
	for err := range errs {
		all = append(all, err)
	}
	require.NoError(t, errors.Join(all...))
	require.Zero(t, engine.TokenizeWaiting(shared))
}
