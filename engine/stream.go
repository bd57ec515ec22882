package engine

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"sync"
	"sync/atomic"

	"github.com/govllm/govllm/detok"
	"github.com/govllm/govllm/llm"
)

// nextRequestID numbers the requests (and stats queries) of every Engine in the process. The
// engines of a process run one after another on one interpreter, where a backend thread may
// outlive its engine and still emit: with ids never reused, such a late event matches no
// request of the next engine, and an id names one request in the logs.
var nextRequestID atomic.Int64

// Stream is the output of one request. Recv is meant for one reader goroutine; Close may be
// called from any goroutine.
type Stream struct {
	e   *Engine
	id  int64
	max int

	sampling SamplingParams // what the Go-side detokenizer and stop strings need
	text     *textState     // poller-only: set by the prompt event when Go detokenizes
	parse    *parseState    // poller-only: set when the request asked for output parsing

	notify  chan struct{} // capacity 1: "something changed"
	stop    func() bool   // unregisters the ctx watcher
	touched bool          // poller-only: already in this batch's wake list

	mu      sync.Mutex
	pending []pendingDelta
	head    int
	lastOf  []int // per choice: where in pending its last delta is (valid while unread: see lastUnread)
	backlog int   // unread tokens plus unread deltas: what MaxPendingTokens bounds
	done    bool
	err     error
	usage   Usage
	ctxErr  error
	prompt  []int32 // the prompt event's ids
	// promptLogprobs are the prompt logprobs events' positions (position 0 first), when the
	// request asked for them.
	promptLogprobs []PromptPosition
}

// pendingDelta is an unread delta; more holds text merged into it, appended in amortized O(1).
type pendingDelta struct {
	Delta
	more []byte
}

func newStream(e *Engine, id int64, max int, sp SamplingParams) *Stream {
	return &Stream{e: e, id: id, max: max, sampling: sp, notify: make(chan struct{}, 1)}
}

// watch aborts the request when ctx ends.
func (s *Stream) watch(ctx context.Context) {
	if ctx.Done() == nil {
		return
	}
	stop := context.AfterFunc(ctx, func() {
		s.mu.Lock()
		if s.done {
			s.mu.Unlock()
			return
		}
		s.ctxErr = ctx.Err()
		s.mu.Unlock()
		s.e.abort(s.id)
		s.wake()
	})
	s.mu.Lock()
	s.stop = stop
	s.mu.Unlock()
}

func (s *Stream) wake() {
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

// pushEvent queues a delta event from the poller without waking the reader (the poller wakes
// each touched stream once per batch). False means the reader fell too far behind: the stream
// has been failed with ErrSlowConsumer and the caller aborts the request.
func (s *Stream) pushEvent(ev *event) bool {
	if s.text == nil {
		// A backend that sends text (no Go tokenizer): logprobs come as JSON.
		var logprobs []TokenLogprob
		if len(ev.meta) > 0 {
			var m struct {
				Logprobs []TokenLogprob `json:"logprobs"`
			}
			if json.Unmarshal(ev.meta, &m) == nil {
				logprobs = m.Logprobs
			}
		}
		d := Delta{Index: int(ev.index), TokenIDs: ev.appendTokenIDs(nil), Text: string(ev.text),
			FinishReason: ev.finishReason(), Logprobs: logprobs}
		// The backend matched stop strings itself and does not say which: only a stop token id
		// (or repetition) is known here.
		d.StopReason = finishStopReason(ev.finish, s.sampling.StopTokenIDs, d.TokenIDs)
		return s.deliver(d)
	}
	d, ok := s.text.apply(ev)
	if d.stopString {
		s.e.stopChoice(s.id, int(ev.index))
	}
	if ev.finish == finishError {
		s.finish(Usage{}, &RequestError{Status: 500, Type: "InternalServerError",
			Message: fmt.Sprintf("the engine failed choice %d of the request", ev.index)})
		return true
	}
	if !ok {
		return true
	}
	return s.deliver(Delta{Index: int(ev.index), TokenIDs: d.tokens, Text: d.text, FinishReason: d.finish,
		Logprobs: d.logprobs, StopReason: d.stopReason})
}

// deliver queues a delta for the reader, through the parsers when the request asked for them.
func (s *Stream) deliver(d Delta) bool {
	if s.parse != nil {
		s.deliverParsed(d)
		return true
	}
	return s.push(d)
}

// push queues d (see pushEvent).
func (s *Stream) push(d Delta) bool {
	s.mu.Lock()
	if s.done {
		s.mu.Unlock()
		return true
	}
	ntok := len(d.TokenIDs)
	// A reader that falls behind gets bigger deltas, not more of them (as vLLM's output
	// collector merges DELTA outputs): an event is merged into its choice's last unread delta,
	// which keeps its place in the queue, and costs its tokens only. With n > 1 the choices'
	// events interleave, so the last delta in the queue is usually another choice's.
	index := d.Index
	last := s.lastUnread(index)
	merge := last >= 0 && s.pending[last].FinishReason == ""
	s.backlog += ntok
	if !merge {
		s.backlog++
	}
	if s.backlog > s.max {
		s.done = true
		s.err = ErrSlowConsumer
		s.pending, s.head, s.backlog = nil, 0, 0
		s.mu.Unlock()
		s.e.forget(s.id)
		return false
	}
	if merge {
		p := &s.pending[last]
		p.TokenIDs = append(p.TokenIDs, d.TokenIDs...)
		p.more = append(p.more, d.Text...)
		p.FinishReason = d.FinishReason
		p.StopReason = d.StopReason
		p.Logprobs = append(p.Logprobs, d.Logprobs...)
		p.Reasoning += d.Reasoning // parsed requests only
		p.ToolCalls = append(p.ToolCalls, d.ToolCalls...)
		s.mu.Unlock()
		return true
	}
	s.pending = append(s.pending, pendingDelta{Delta: d})
	for len(s.lastOf) <= index {
		s.lastOf = append(s.lastOf, -1)
	}
	s.lastOf[index] = len(s.pending) - 1
	s.mu.Unlock()
	return true
}

// lastUnread returns where choice index's last delta is in pending if it is still unread, else
// -1. lastOf is not cleared when Recv empties the queue: an entry is valid while it points into
// the unread part at a delta of that choice, for a delta appended there later of the same
// choice would have moved the entry to itself. Called with mu held.
func (s *Stream) lastUnread(index int) int {
	if index < len(s.lastOf) {
		if p := s.lastOf[index]; p >= s.head && p < len(s.pending) && s.pending[p].Index == index {
			return p
		}
	}
	return -1
}

// finish ends the stream with usage, or with err.
func (s *Stream) finish(u Usage, err error) {
	s.mu.Lock()
	if !s.done {
		s.done = true
		s.usage = u
		s.err = err
	}
	stop := s.stop
	s.mu.Unlock()
	if stop != nil {
		stop()
	}
	s.wake()
}

// Recv returns the next delta. After the last delta of every choice it returns io.EOF; a failed
// request returns a *RequestError, ErrEngineDead, ErrSlowConsumer or ErrClosed; a cancelled
// context returns the context's error.
func (s *Stream) Recv() (Delta, error) {
	for {
		s.mu.Lock()
		if s.ctxErr != nil {
			err := s.ctxErr
			s.mu.Unlock()
			return Delta{}, err
		}
		if s.head < len(s.pending) {
			p := s.pending[s.head]
			s.pending[s.head] = pendingDelta{}
			s.head++
			d := p.Delta
			if len(p.more) > 0 {
				d.Text += string(p.more)
			}
			s.backlog -= 1 + len(d.TokenIDs)
			if s.head == len(s.pending) {
				s.pending, s.head = s.pending[:0], 0
			}
			s.mu.Unlock()
			return d, nil
		}
		if s.done {
			err := s.err
			s.mu.Unlock()
			if err == nil {
				err = io.EOF
			}
			return Delta{}, err
		}
		s.mu.Unlock()
		<-s.notify
	}
}

func (s *Stream) setPrompt(ids []int32) {
	s.mu.Lock()
	s.prompt = ids
	s.mu.Unlock()
}

// PromptTokenIDs returns the prompt's token ids as the backend tokenized it (chat template
// applied), once known: by the time Recv returns the first delta. Nil before, and for backends
// that do not report them. The slice must not be modified.
func (s *Stream) PromptTokenIDs() []int32 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.prompt
}

// Usage returns the token counts; it is complete once Recv has returned io.EOF.
func (s *Stream) Usage() Usage {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.usage
}

// ID returns the engine's number for this request.
func (s *Stream) ID() int64 { return s.id }

// Abort asks the backend to stop the request early, as Close does, but keeps the stream open:
// Recv goes on returning what the backend sent before it stopped, then io.EOF, and Usage counts
// the tokens generated until then. Choices cut short get no delta with a finish reason. Abort
// does nothing once the stream has ended; Close must still be called.
func (s *Stream) Abort() {
	s.mu.Lock()
	done := s.done
	s.mu.Unlock()
	if !done {
		s.e.abort(s.id)
	}
}

// Close abandons the stream: an unfinished request is aborted in the backend. It is safe to
// call more than once and after the stream ended.
func (s *Stream) Close() {
	s.mu.Lock()
	wasDone := s.done
	if !wasDone {
		s.done = true
		s.err = ErrClosed
	}
	stop := s.stop
	s.pending, s.head = nil, 0
	s.mu.Unlock()
	if stop != nil {
		stop()
	}
	if !wasDone {
		// Keep routing until the backend confirms the abort with END, so that late events
		// are dropped quietly; the table entry goes away then.
		s.e.abort(s.id)
	}
	s.wake()
}

// PromptPosition is llm.PromptPosition.
type PromptPosition = llm.PromptPosition

// promptLogprobsPiece is the meta of an evPromptLogprobs event: the rows of consecutive prompt
// positions from position 1 on (a backend that prefills in chunks sends several pieces, in
// order). Row r holds the position's prompt token first, then the most likely tokens;
// Ranks[r] is the rank of that prompt token.
type promptLogprobsPiece struct {
	TokenIDs [][]int32   `json:"token_ids"`
	Logprobs [][]float64 `json:"logprobs"`
	Ranks    []int       `json:"ranks"`
}

// addPromptLogprobs appends the positions of an evPromptLogprobs event (poller only). tok, when
// Go detokenizes, gives the tokens' texts as vLLM decodes them (detok.LogprobText with the
// prompt before the position as context).
func (s *Stream) addPromptLogprobs(meta []byte, tok *detok.Tokenizer) {
	var piece promptLogprobsPiece
	if err := json.Unmarshal(meta, &piece); err != nil || len(piece.Logprobs) != len(piece.TokenIDs) ||
		len(piece.Ranks) != len(piece.TokenIDs) {
		s.e.log.Warn("engine: malformed prompt logprobs", "request", s.id, "err", err)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	prompt := s.prompt
	if len(s.promptLogprobs) == 0 {
		first := PromptPosition{}
		if tok != nil && len(prompt) > 0 {
			first.Token = tok.Decode(prompt[:1], detok.Options{})
		}
		s.promptLogprobs = append(s.promptLogprobs, first)
	}
	for r, ids := range piece.TokenIDs {
		pos := len(s.promptLogprobs)
		var ctx []int32
		if pos <= len(prompt) {
			ctx = prompt[:pos]
		}
		entries := make([]llm.PromptLogprob, 0, len(ids))
		for c, id := range ids {
			if c >= len(piece.Logprobs[r]) {
				break
			}
			rank := c // the most likely tokens rank 1, 2, ...
			if c == 0 {
				rank = piece.Ranks[r]
			}
			e := llm.PromptLogprob{TokenID: id, Logprob: floorLogprob(piece.Logprobs[r][c]), Rank: rank}
			if tok != nil {
				e.Token = tok.LogprobText(id, ctx)
			}
			// A token id appears once, where it first appears, with its later value (a dict
			// keyed by token id, as vLLM builds it).
			dup := false
			for i := range entries {
				if entries[i].TokenID == id {
					entries[i].Logprob, entries[i].Rank, dup = e.Logprob, e.Rank, true
					break
				}
			}
			if !dup {
				entries = append(entries, e)
			}
		}
		p := PromptPosition{Entries: entries}
		if len(entries) > 0 {
			p.Token = entries[0].Token
		}
		s.promptLogprobs = append(s.promptLogprobs, p)
	}
}

// floorLogprob floors -inf and NaN, which JSON cannot carry.
func floorLogprob(lp float64) float64 {
	if math.IsNaN(lp) || lp < logprobFloor {
		return logprobFloor
	}
	return lp
}

// PromptLogprobs returns the prompt's logprobs when the request set
// SamplingParams.PromptLogprobs: one position per prompt token, the first without logprobs.
// They are complete by the time Recv returns the first delta; nil before, and for backends
// that do not compute them. The slice must not be modified.
func (s *Stream) PromptLogprobs() []PromptPosition {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.promptLogprobs
}
