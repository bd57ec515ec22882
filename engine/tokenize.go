package engine

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"

	"github.com/govllm/govllm/detok"
	"github.com/govllm/govllm/llm"
)

// Tokenizing without generating (llm.Tokenizer): Tokenize, and Detokenize when Go has no
// detokenizer for the model, are one cmdTokenize round trip each. The bridge
// (govllm/tokenizing.py) renders messages with the chat template generation uses and
// tokenizes with the backend's tokenizer, and answers evTokenized, or evError for the same
// request id. A caller whose ctx ends stops waiting at once and its waiter is dropped; the
// bridge's late answer then finds no waiter and is ignored (the bridge keeps no state for
// it: its work is one synchronous call).

var _ llm.Tokenizer = (*Engine)(nil)

// tokenizeCommand is cmdTokenize's payload.
type tokenizeCommand struct {
	Op string `json:"op"` // "tokenize" or "detokenize"
	llm.TokenizeRequest
	Tokens []int32 `json:"tokens,omitempty"` // detokenize
}

// tokenizedEvent is evTokenized's meta.
type tokenizedEvent struct {
	Tokens    []int32  `json:"tokens"`
	TokenStrs []string `json:"token_strs"`
	Text      string   `json:"text"`
}

// tokenizeReply is what the poller hands a waiting round trip: evTokenized's meta (copied out
// of the poll buffer) or the error of an evError.
type tokenizeReply struct {
	meta []byte
	err  error
}

// tokenizeWaits is the table of round trips waiting for the bridge; the zero value is ready.
type tokenizeWaits struct {
	mu sync.Mutex
	m  map[int64]chan tokenizeReply
}

func (t *tokenizeWaits) add(id int64, ch chan tokenizeReply) {
	t.mu.Lock()
	if t.m == nil {
		t.m = make(map[int64]chan tokenizeReply)
	}
	t.m[id] = ch
	t.mu.Unlock()
}

func (t *tokenizeWaits) remove(id int64) {
	t.mu.Lock()
	delete(t.m, id)
	t.mu.Unlock()
}

// deliver hands r to the round trip id, if it still waits; it never blocks (the poller calls
// it). It reports whether one waited.
func (t *tokenizeWaits) deliver(id int64, r tokenizeReply) bool {
	t.mu.Lock()
	ch := t.m[id]
	delete(t.m, id)
	t.mu.Unlock()
	if ch == nil {
		return false
	}
	ch <- r // buffered, and only this delivery sends
	return true
}

// pending is the number of round trips waiting (for tests).
func (t *tokenizeWaits) pending() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.m)
}

// onTokenizeEvent routes an evTokenized, or an evError no stream claimed, to its round trip.
func (e *Engine) onTokenizeEvent(ev *event) {
	r := tokenizeReply{}
	if ev.kind == evError {
		r.err = decodeRequestError(ev.meta)
	} else {
		r.meta = append([]byte(nil), ev.meta...)
	}
	e.tokenizing.deliver(ev.reqID, r)
}

// decodeRequestError reads an evError's meta.
func decodeRequestError(meta []byte) *RequestError {
	re := &RequestError{Status: 500, Type: "InternalServerError"}
	if err := json.Unmarshal(meta, re); err != nil || re.Message == "" {
		re.Message = string(meta)
	}
	return re
}

// Tokenize renders and tokenizes req with the backend's tokenizer, as Generate would for the
// same input. It waits for the bridge until ctx ends.
func (e *Engine) Tokenize(ctx context.Context, req llm.TokenizeRequest) (llm.TokenizeResult, error) {
	if (len(req.Messages) > 0) == (req.Prompt != "") {
		return llm.TokenizeResult{}, &RequestError{Status: 400, Type: "BadRequestError", Param: "prompt",
			Message: "exactly one of messages and prompt must be set"}
	}
	var m tokenizedEvent
	if err := e.roundTrip(ctx, &tokenizeCommand{Op: "tokenize", TokenizeRequest: req}, &m); err != nil {
		return llm.TokenizeResult{}, err
	}
	if req.ReturnTokenStrs && len(m.TokenStrs) != len(m.Tokens) {
		return llm.TokenizeResult{}, fmt.Errorf("engine: tokenize: the bridge gave %d token strings for %d tokens",
			len(m.TokenStrs), len(m.Tokens))
	}
	res := llm.TokenizeResult{TokenIDs: m.Tokens}
	if req.ReturnTokenStrs {
		res.TokenStrs = m.TokenStrs
	}
	if res.TokenIDs == nil {
		res.TokenIDs = []int32{}
	}
	return res, nil
}

// Detokenize decodes ids as the tokenizer's decode does by default (special tokens kept, as
// vLLM's /detokenize): in Go when the engine has the model's tokenizer.json decoder, else in
// the bridge. An id the tokenizer does not know is a 400 naming "tokens".
func (e *Engine) Detokenize(ctx context.Context, ids []int32) (string, error) {
	if tok := e.tok.Load(); tok != nil {
		if err := ctx.Err(); err != nil {
			return "", fmt.Errorf("engine: detokenize: %w", err)
		}
		if err := e.Health(); err != nil {
			return "", err
		}
		for _, id := range ids {
			if _, ok := tok.Token(id); !ok {
				return "", outOfVocabulary(id)
			}
		}
		return tok.Decode(ids, detok.Options{SkipSpecialTokens: false, SpacesBetweenSpecialTokens: true}), nil
	}
	var m tokenizedEvent
	if err := e.roundTrip(ctx, &tokenizeCommand{Op: "detokenize", Tokens: ids}, &m); err != nil {
		return "", err
	}
	return m.Text, nil
}

// outOfVocabulary is the 400 for an id the tokenizer does not know, worded as vLLM's.
func outOfVocabulary(id int32) *RequestError {
	return &RequestError{Status: 400, Type: "BadRequestError", Param: "tokens",
		Message: fmt.Sprintf("Token id %d is out of vocabulary", id)}
}

// roundTrip sends cmd to the bridge and decodes its evTokenized answer into out.
func (e *Engine) roundTrip(ctx context.Context, cmd *tokenizeCommand, out *tokenizedEvent) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("engine: %s: %w", cmd.Op, err)
	}
	if err := e.Health(); err != nil {
		return err
	}
	payload, err := json.Marshal(cmd)
	if err != nil {
		return fmt.Errorf("engine: encode %s command: %w", cmd.Op, err)
	}
	id := nextRequestID.Add(1)
	ch := make(chan tokenizeReply, 1)
	e.tokenizing.add(id, ch)
	defer e.tokenizing.remove(id)
	if rc := e.api.send(cmdTokenize, id, &payload[0], int64(len(payload))); rc != 0 {
		return fmt.Errorf("%w: %s: %s", ErrEngineDead, cmd.Op, e.api.lastError())
	}
	select {
	case r := <-ch:
		if r.err != nil {
			return r.err
		}
		if err := json.Unmarshal(r.meta, out); err != nil {
			return fmt.Errorf("engine: bad tokenized event: %w", err)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("engine: %s: %w", cmd.Op, ctx.Err())
	case <-e.stopped:
		if err := e.Health(); err != nil {
			return err
		}
		return ErrClosed
	}
}
