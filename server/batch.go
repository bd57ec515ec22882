package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"

	"github.com/govllm/govllm/llm"
)

// Bounds of a completion request with several prompts.
const (
	// maxPrompts is the most prompts one /v1/completions request may carry.
	maxPrompts = 64
	// maxBatchChoices bounds prompts × n: the choices one request streams.
	maxBatchChoices = 256
)

// batchStream is the output of a completion request with several prompts, one engine request
// per prompt, as one llm.TokenStream: choice j of prompt p is choice p×n + j (vLLM's
// numbering), deltas of all prompts interleave as they come, and the usage is the sum. The
// server's call machinery (admission, abort, timeouts, metrics) then treats the request as one
// with prompts × n choices. Recv is for one goroutine; Abort and Close may be called from any.
type batchStream struct {
	n      int // choices per prompt
	subs   []llm.TokenStream
	cancel context.CancelFunc // ends the context the sub-requests were started with
	out    chan batchItem
	quit   chan struct{} // closed by Close: the forwarders stop
	wg     sync.WaitGroup
	once   sync.Once

	live int   // sub-streams not at io.EOF yet (Recv's goroutine only)
	err  error // the error that ended the stream (Recv's goroutine only)
}

// batchItem is what a forwarder hands Recv: a renumbered delta, or how its sub-stream ended.
type batchItem struct {
	d   llm.Delta
	err error
}

// startBatch starts reqs, one per prompt, with n choices each. If one cannot start, those
// already started are closed and its error is returned.
func startBatch(ctx context.Context, g llm.Generator, reqs []llm.Request, n int) (*batchStream, error) {
	ctx, cancel := context.WithCancel(ctx)
	b := &batchStream{n: n, cancel: cancel, out: make(chan batchItem), quit: make(chan struct{}), live: len(reqs)}
	for i, req := range reqs {
		sub, err := g.Generate(ctx, req)
		if err != nil {
			for _, s := range b.subs {
				s.Close()
			}
			cancel()
			return nil, fmt.Errorf("prompt %d: %w", i, err)
		}
		b.subs = append(b.subs, sub)
	}
	b.wg.Add(len(b.subs))
	for p, sub := range b.subs {
		go b.forward(p, sub)
	}
	return b, nil
}

// forward relays the deltas of prompt p's stream, renumbered, then how it ended.
func (b *batchStream) forward(p int, sub llm.TokenStream) {
	defer b.wg.Done()
	for {
		d, err := sub.Recv()
		if err == nil {
			d.Index += p * b.n
		}
		select {
		case b.out <- batchItem{d: d, err: err}:
		case <-b.quit:
			return
		}
		if err != nil {
			return
		}
	}
}

// Recv returns the next delta of any prompt, io.EOF once every prompt's stream has ended, or
// the first error that ended one of them (the whole request fails, as in vLLM).
func (b *batchStream) Recv() (llm.Delta, error) {
	for b.err == nil {
		if b.live == 0 {
			b.err = io.EOF
			break
		}
		select {
		case it := <-b.out:
			switch {
			case it.err == nil:
				return it.d, nil
			case errors.Is(it.err, io.EOF):
				b.live--
			default:
				b.err = it.err
			}
		case <-b.quit:
			b.err = llm.ErrClosed
		}
	}
	return llm.Delta{}, b.err
}

// Usage sums the prompts' usage.
func (b *batchStream) Usage() llm.Usage {
	var u llm.Usage
	for _, s := range b.subs {
		su := s.Usage()
		u.PromptTokens += su.PromptTokens
		u.CompletionTokens += su.CompletionTokens
	}
	return u
}

// Abort stops every prompt's request early (llm.Aborter). A sub-stream that cannot abort is
// cancelled instead, which ends it with the context's error.
func (b *batchStream) Abort() {
	for _, s := range b.subs {
		if a, ok := s.(llm.Aborter); ok {
			a.Abort()
		} else {
			b.cancel()
		}
	}
}

// Close closes every prompt's stream (aborting unfinished requests) and waits for the
// forwarders to end.
func (b *batchStream) Close() {
	b.once.Do(func() {
		close(b.quit)
		for _, s := range b.subs {
			s.Close()
		}
		b.cancel()
		b.wg.Wait()
	})
}

// promptTokenIDs returns prompt p's token ids as its backend reported them, or nil.
func (b *batchStream) promptTokenIDs(p int) []int32 {
	if pt, ok := b.subs[p].(promptTokens); ok {
		return pt.PromptTokenIDs()
	}
	return nil
}

// promptTokenCount is prompt p's token count while its request runs, for continuous usage.
func (b *batchStream) promptTokenCount(p int) int {
	if ids := b.promptTokenIDs(p); ids != nil {
		return len(ids)
	}
	return b.subs[p].Usage().PromptTokens
}

// subRequestID is the engine request id of prompt p of request id, as vLLM names them.
func subRequestID(id string, p int) string { return id + "-" + strconv.Itoa(p) }
