package engine

import (
	"context"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/detok"
	"github.com/govllm/govllm/llm"
	"github.com/govllm/govllm/tokenize"
)

// TestDetokenizeInGo: with the model's tokenizer.json loaded, Detokenize decodes in Go (no
// command reaches the bridge), keeps special tokens and refuses unknown ids.
func TestDetokenizeInGo(t *testing.T) {
	dir := filepath.Join("..", "models", "SmolLM2-135M-Instruct")
	tok, err := detok.Load(dir)
	if err != nil {
		t.Skipf("no default model tokenizer (run scripts/bootstrap): %v", err)
	}
	enc, err := tokenize.Load(dir)
	require.NoError(t, err)
	e := fakeEngine()
	var sent atomic.Int32
	e.api.send = func(int32, int64, *byte, int64) int32 { sent.Add(1); return 0 }
	e.tok.Store(tok)

	const text = "héllo wörld 你好 🎉"
	ids := enc.Encode("<|im_start|>"+text, false)
	got, err := e.Detokenize(t.Context(), ids)
	require.NoError(t, err)
	require.Equal(t, "<|im_start|>"+text, got)

	_, err = e.Detokenize(t.Context(), []int32{ids[0], int32(tok.VocabSize())})
	var re *llm.RequestError
	require.ErrorAs(t, err, &re)
	require.Equal(t, "tokens", re.Param)
	require.Zero(t, sent.Load())
}

// TestTokenizeRouting: the poller hands evTokenized and evError to the waiting round trip by
// request id, and drops answers nobody waits for.
func TestTokenizeRouting(t *testing.T) {
	e := fakeEngine()
	ids := make(chan int64, 4)
	e.api.send = func(kind int32, id int64, _ *byte, _ int64) int32 {
		if kind == cmdTokenize {
			ids <- id
		}
		return 0
	}
	type result struct {
		res llm.TokenizeResult
		err error
	}
	call := func(ctx context.Context) chan result {
		out := make(chan result, 1)
		go func() {
			res, err := e.Tokenize(ctx, llm.TokenizeRequest{Prompt: "x", ReturnTokenStrs: true})
			out <- result{res, err}
		}()
		return out
	}

	ok := call(t.Context())
	id := <-ids
	e.handle(&event{kind: evTokenized, reqID: id + 1000, meta: []byte(`{"tokens":[9]}`)}) // nobody waits: dropped
	e.handle(&event{kind: evTokenized, reqID: id, meta: []byte(`{"tokens":[1,2],"token_strs":["a","b"]}`)})
	r := <-ok
	require.NoError(t, r.err)
	require.Equal(t, llm.TokenizeResult{TokenIDs: []int32{1, 2}, TokenStrs: []string{"a", "b"}}, r.res)

	failed := call(t.Context())
	id = <-ids
	e.handle(&event{kind: evError, reqID: id, meta: []byte(`{"status":501,"type":"NotImplementedError","message":"no tokenizer"}`)})
	r = <-failed
	var re *llm.RequestError
	require.ErrorAs(t, r.err, &re)
	require.Equal(t, 501, re.Status)

	ctx, cancel := context.WithCancel(t.Context())
	cancelled := call(ctx)
	id = <-ids
	cancel()
	select {
	case r = <-cancelled:
		require.ErrorIs(t, r.err, context.Canceled)
	case <-time.After(5 * time.Second):
		t.Fatal("Tokenize did not return when its context ended")
	}
	require.Zero(t, e.tokenizing.pending())
	e.handle(&event{kind: evTokenized, reqID: id, meta: []byte(`{"tokens":[1]}`)}) // late: dropped

	bad := call(t.Context())
	id = <-ids
	e.handle(&event{kind: evTokenized, reqID: id, meta: []byte(`{"tokens":[1,2],"token_strs":["a"]}`)})
	require.ErrorContains(t, (<-bad).err, "1 token strings for 2 tokens")
}
