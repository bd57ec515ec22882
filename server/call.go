package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/govllm/govllm/llm"
)

// abortGrace is how long an aborted request may take to end in the backend before its stream is
// closed without the backend's last word (and its usage).
const abortGrace = 2 * time.Second

// format writes the output of one kind of completion: chat or text.
type format interface {
	// writeDelta appends the events of d to sw; first says whether d is its choice's first
	// output.
	writeDelta(sw *sseWriter, c *call, d llm.Delta, first bool)
	// usageChunk is the last event when the client asked for usage.
	usageChunk(c *call, u usage) any
	// response is the body of a non-streamed answer.
	response(c *call, outs []choiceOut, u usage) any
}

// choiceOut is the whole output of one choice of a non-streamed answer.
type choiceOut struct {
	text      string // with the echoed prompt of a text completion
	reasoning string
	toolCalls []llm.ToolCall
	reason    string
	logprobs  []llm.TokenLogprob // when c.params.logprobs
	// stopReason is the matched stop string or stop token id (llm.Delta.StopReason), or nil.
	stopReason any
}

// promptTokens is what a stream may offer for return_token_ids' prompt_token_ids
// (engine.Stream does).
type promptTokens interface {
	PromptTokenIDs() []int32
}

// promptIDs returns the prompt's token ids for return_token_ids, or nil.
func (c *call) promptIDs() *[]int32 {
	if !c.params.tokenIDs {
		return nil
	}
	if p, ok := c.stream.(promptTokens); ok {
		return nonNilIDs(p.PromptTokenIDs())
	}
	return nil
}

// choicePromptIDs is promptIDs for the prompt of choice i (several prompts: batch.go).
func (c *call) choicePromptIDs(i int) *[]int32 {
	b, ok := c.stream.(*batchStream)
	if !ok || !c.params.tokenIDs {
		return c.promptIDs()
	}
	return nonNilIDs(b.promptTokenIDs(i / b.n))
}

// echoOf is the echoed prompt put before choice i's text, or "".
func (c *call) echoOf(i int) string {
	if len(c.echoes) == 0 {
		return ""
	}
	return c.echoes[i*len(c.echoes)/c.params.n]
}

// usageSoFar is the usage a chunk of choice i carries with continuous_usage_stats: its
// prompt's tokens and the tokens choice i generated so far, as vLLM counts them per choice.
// completion says whether to count those (false for the role chunk).
func (c *call) usageSoFar(i int, completion bool) *usage {
	if !c.params.continuousUsage {
		return nil
	}
	var u llm.Usage
	switch st := c.stream.(type) {
	case *batchStream:
		u.PromptTokens = st.promptTokenCount(i / st.n)
	case promptTokens:
		if ids := st.PromptTokenIDs(); ids != nil {
			u.PromptTokens = len(ids)
			break
		}
		u.PromptTokens = c.stream.Usage().PromptTokens
	default:
		u.PromptTokens = c.stream.Usage().PromptTokens
	}
	if completion {
		u.CompletionTokens = c.choiceTokens[i]
	}
	out := toUsage(u)
	return &out
}

// call is one completion, chat or text, in flight.
type call struct {
	id          string
	created     int64
	model       string
	fingerprint string
	params      callParams
	// echoes are, for text completions with echo, the prompts put before their choices' texts
	// (one per prompt; choice i belongs to prompt i / n).
	echoes []string
	// startStream, when set, starts the request instead of Generator.Generate (several
	// prompts: startBatch).
	startStream func(ctx context.Context) (llm.TokenStream, error)
	log         *slog.Logger
	start       time.Time
	kind        string // "chat" or "text", for logs
	// newID makes the ids of the tool calls the server makes (forced tool choice).
	newID func(prefix string) string
	// forced holds, per choice, the extractor of a streamed forced tool choice's calls.
	forced []*forcedCalls

	stream    llm.TokenStream
	cancelGen context.CancelFunc // ends the context the stream was started with
	track     choiceTracker
	closing   bool // the request was aborted and its stream has ended: finish the rest as "abort"
	tokens    int  // tokens received
	firstTok  bool
	lastTok   []time.Time // per choice, when its previous output arrived
	// choiceTokens counts, per choice, the tokens received (continuous_usage_stats,
	// vllm:request_generation_tokens).
	choiceTokens []int
	maxTokens    int // the request's max_tokens, 0 when unset (vllm:request_params_max_tokens)
	// textOffset is, per choice, the length of the logprob tokens streamed so far (text
	// completions' text_offset).
	textOffset []int
	tokenIDs   [][]int32 // per choice, with return_token_ids, when not streamed
	// chunkPrefix is the start of this call's streamed content chunks (sseWriter.appendContentChunk).
	chunkPrefix []byte

	mu      sync.Mutex
	aborted atomic.Bool
	grace   *time.Timer
	ended   bool // the handler is done with the stream: abort has nothing left to do
}

// abort stops the request from the server's side (timeout, shutdown): the output so far goes
// out and unfinished choices end with finish_reason "abort".
func (c *call) abort() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ended || !c.aborted.CompareAndSwap(false, true) {
		return
	}
	if a, ok := c.stream.(llm.Aborter); ok {
		a.Abort()
		c.grace = time.AfterFunc(abortGrace, c.stream.Close)
		return
	}
	c.cancelGen()
}

// stopTimers stops the grace timer of abort, if any, and any abort to come.
func (c *call) stopTimers() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ended = true
	if c.grace != nil {
		c.grace.Stop()
	}
}

// endsAbort reports whether err, from an aborted request's stream, is how such a stream ends.
func endsAbort(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, context.Canceled) ||
		errors.Is(err, context.DeadlineExceeded) || errors.Is(err, llm.ErrClosed)
}

// next returns the next delta that has text or a finish reason, io.EOF after the last delta of
// every choice, or the error that ended the stream. It records the token metrics.
func (s *Server) next(c *call) (llm.Delta, error) {
	for {
		if c.closing {
			if d, ok := c.track.abortNext(); ok {
				s.metrics.finished(d.FinishReason)
				return d, nil
			}
			return llm.Delta{}, io.EOF
		}
		d, err := c.stream.Recv()
		switch {
		case err == nil:
			if err := c.track.add(d); err != nil {
				return llm.Delta{}, err
			}
			s.observeDelta(c, d)
			c.params.shape(&d)
			if d.Text == "" && d.FinishReason == "" && (len(d.Logprobs) == 0 || !c.params.logprobs) &&
				(len(d.TokenIDs) == 0 || !c.params.tokenIDs) && d.Reasoning == "" && len(d.ToolCalls) == 0 {
				continue
			}
			return d, nil
		case c.aborted.Load() && endsAbort(err):
			c.closing = true
		case errors.Is(err, io.EOF):
			if err := c.track.done(); err != nil {
				return llm.Delta{}, err
			}
			return llm.Delta{}, io.EOF
		default:
			return llm.Delta{}, err
		}
	}
}

// shape applies the request's output options to d: include_reasoning false drops its
// reasoning; parallel_tool_calls false (auto tool choice) keeps only the first call.
func (p *callParams) shape(d *llm.Delta) {
	if p.dropReasoning {
		d.Reasoning = ""
	}
	if p.singleCall && len(d.ToolCalls) > 0 {
		kept := d.ToolCalls[:0:0]
		for _, tc := range d.ToolCalls {
			if tc.Index == 0 {
				kept = append(kept, tc)
			}
		}
		d.ToolCalls = kept
	}
}

// observeDelta records the metrics of one delta.
func (s *Server) observeDelta(c *call, d llm.Delta) {
	now := s.now()
	if k := len(d.TokenIDs); k > 0 {
		c.tokens += k
		c.choiceTokens[d.Index] += k
		s.metrics.generationTokens.Add(float64(k))
		if !c.firstTok {
			c.firstTok = true
			s.metrics.ttft.Observe(now.Sub(c.start).Seconds())
		} else if last := c.lastTok[d.Index]; !last.IsZero() {
			// A delta may carry several tokens (a reader that fell behind gets them merged):
			// spread the gap over them.
			gap := now.Sub(last).Seconds() / float64(k)
			for range k {
				s.metrics.itl.Observe(gap)
			}
		}
		c.lastTok[d.Index] = now
	}
	if d.FinishReason != "" {
		s.metrics.finished(d.FinishReason)
	}
}

// usage is the request's token count once its stream has ended. An aborted request whose
// backend did not report counts gets the tokens the server saw.
func (c *call) usage() usage {
	u := c.stream.Usage()
	if c.aborted.Load() && u == (llm.Usage{}) {
		u.CompletionTokens = c.tokens
	}
	return toUsage(u)
}

// newCall names req with the request's id (prefix + X-Request-Id or a generated id) and
// returns its call: a chat-shaped request (chat completions, responses) of kind.
func (s *Server) newCall(r *http.Request, req *llm.Request, params callParams, info llm.ModelInfo,
	start time.Time, prefix, kind string) *call {
	req.ID = requestID(r, prefix)
	c := &call{
		id:          req.ID,
		created:     start.Unix(),
		model:       responseModel(*req, info),
		fingerprint: fingerprint(info),
		params:      params,
		log:         s.log.With("request_id", req.ID),
		start:       start,
		kind:        kind,
		newID:       s.newID,
	}
	if params.forced != nil && params.stream {
		c.forced = make([]*forcedCalls, params.n)
	}
	return c
}

// generate admits req, runs it and answers with f, streamed or not.
func (s *Server) generate(w http.ResponseWriter, r *http.Request, req llm.Request, c *call, f format) {
	reject := func(err error, e *apiError) { s.reject(w, c.log, err, e) }
	s.run(w, r, req, c, reject, func() bool {
		if c.params.stream {
			return s.streamOut(w, c, f)
		}
		return s.completeOut(w, c, f)
	})
}

// run admits req, starts it and hands the stream to out, which answers and reports whether the
// request completed; reject answers a request refused before it started, in the route's own
// error shape. Every route that generates goes through here, so admission, the abort and timeout
// paths and the per-request metrics are the same for all.
func (s *Server) run(w http.ResponseWriter, r *http.Request, req llm.Request, c *call,
	reject func(err error, e *apiError), out func() bool) {
	ctx := r.Context()
	if s.backend.Model().Runner == llm.RunnerPooling {
		e := badRequest("model", "The model `%s` is served with the pooling runner (--runner pooling), which only makes embeddings: use /v1/embeddings, or start the server with --runner generate.", c.model)
		reject(e, e)
		return
	}
	release, e := s.admit(ctx, c.start)
	if release == nil {
		if e != nil {
			w.Header().Set("Retry-After", retryAfter)
		}
		reject(fmt.Errorf("server: admission: %w", errNotAdmitted), e)
		return
	}
	defer release()

	genCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	var stream llm.TokenStream
	var err error
	if c.startStream != nil {
		stream, err = c.startStream(genCtx)
	} else {
		stream, err = s.backend.Generate(genCtx, req)
	}
	if err != nil {
		reject(fmt.Errorf("server: generate: %w", err), toAPIError(err))
		return
	}
	defer stream.Close()
	c.stream, c.cancelGen = stream, cancel
	c.track = newChoiceTracker(c.params.n)
	c.lastTok = make([]time.Time, c.params.n)
	c.choiceTokens = make([]int, c.params.n)
	c.maxTokens = req.Sampling.MaxTokens
	c.textOffset = make([]int, c.params.n)
	if c.params.tokenIDs {
		c.tokenIDs = make([][]int32, c.params.n)
	}
	defer c.stopTimers()

	stopAbort := context.AfterFunc(s.abortCtx, c.abort)
	defer stopAbort()
	if s.requestTimeout > 0 {
		t := time.AfterFunc(s.requestTimeout-s.now().Sub(c.start), c.abort)
		defer t.Stop()
	}

	if out() {
		s.metrics.e2e.Observe(s.now().Sub(c.start).Seconds())
	}
}

// completeOut collects the whole output and answers with one object. It reports whether the
// request completed (finished or aborted by the server).
func (s *Server) completeOut(w http.ResponseWriter, c *call, f format) bool {
	n := c.params.n
	texts := make([]strings.Builder, n)
	reasoning := make([]strings.Builder, n)
	outs := make([]choiceOut, n)
	for {
		d, err := s.next(c)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			s.reject(w, c.log, fmt.Errorf("server: %s completion: %w", c.kind, err), toAPIError(err))
			return false
		}
		o := &outs[d.Index]
		texts[d.Index].WriteString(d.Text)
		reasoning[d.Index].WriteString(d.Reasoning)
		if len(d.ToolCalls) > 0 {
			o.toolCalls = mergeToolCalls(o.toolCalls, d.ToolCalls)
		}
		if c.params.tokenIDs {
			c.tokenIDs[d.Index] = append(c.tokenIDs[d.Index], d.TokenIDs...)
		}
		if c.params.logprobs {
			o.logprobs = append(o.logprobs, d.Logprobs...)
		}
		if d.FinishReason != "" {
			o.reason = d.FinishReason
			o.stopReason = d.StopReason
		}
	}
	u := c.usage()
	for i := range outs {
		outs[i].text = c.echoOf(i) + texts[i].String()
		outs[i].reasoning = reasoning[i].String()
	}
	writeJSON(w, http.StatusOK, f.response(c, outs, u))
	s.logDone(c, u)
	return true
}

// streamOut sends the output as server-sent events, flushed per delta, then the usage chunk if
// asked for, and [DONE]. It reports whether the request completed.
func (s *Server) streamOut(w http.ResponseWriter, c *call, f format) bool {
	if es, ok := f.(eventStreamer); ok {
		return es.streamEvents(s, w, c)
	}
	sw := newSSEWriter(w)
	sent := make([]bool, c.params.n) // whether the choice's first output went out
	for {
		d, err := s.next(c)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			s.failStream(w, sw, c, err)
			return false
		}
		f.writeDelta(sw, c, d, !sent[d.Index])
		sent[d.Index] = true
		if err := sw.flush(); err != nil {
			c.log.Debug("client went away", "err", err)
			return false
		}
	}
	u := c.usage()
	if c.params.includeUsage {
		sw.writeSSE(f.usageChunk(c, u))
	}
	sw.writeDone()
	if err := sw.flush(); err != nil {
		c.log.Debug("client went away", "err", err)
		return false
	}
	s.logDone(c, u)
	return true
}

// failStream answers err: with an error status if nothing was sent yet, else with an SSE error
// event followed by [DONE].
func (s *Server) failStream(w http.ResponseWriter, sw *sseWriter, c *call, err error) {
	e := toAPIError(err)
	err = fmt.Errorf("server: %s completion stream: %w", c.kind, err)
	if !sw.started {
		s.reject(w, c.log, err, e)
		return
	}
	s.logFailure(c.log, err, e)
	if e == nil {
		return
	}
	sw.writeSSE(e.body())
	sw.writeDone()
	if err := sw.flush(); err != nil {
		c.log.Debug("client went away", "err", err)
	}
}

// reject logs err and answers with e; a nil e means the client is gone and gets no answer.
func (s *Server) reject(w http.ResponseWriter, log *slog.Logger, err error, e *apiError) {
	s.logFailure(log, err, e)
	if e != nil {
		writeError(w, e)
	}
}

// logFailure logs a failed request: server-side failures as errors, the rest for debugging.
func (s *Server) logFailure(log *slog.Logger, err error, e *apiError) {
	switch {
	case e == nil:
		log.Debug("client went away", "err", err)
	case e.Status >= 500:
		log.Error("request failed", "status", e.Status, "err", err)
	default:
		log.Debug("request rejected", "status", e.Status, "err", err)
	}
}

func (s *Server) logDone(c *call, u usage) {
	s.metrics.promptTokens.Add(float64(u.PromptTokens))
	s.metrics.requestDone(c.params.n, c.maxTokens, u.PromptTokens, c.choiceTokens)
	c.log.Debug(c.kind+" completion done",
		"stream", c.params.stream,
		"n", c.params.n,
		"aborted", c.aborted.Load(),
		"prompt_tokens", u.PromptTokens,
		"completion_tokens", u.CompletionTokens,
		"duration", s.now().Sub(c.start))
}

// choiceTracker checks the deltas of a request against its n choices.
type choiceTracker struct {
	finished []bool
	left     int
}

func newChoiceTracker(n int) choiceTracker {
	return choiceTracker{finished: make([]bool, n), left: n}
}

// add records d and reports an error if the request cannot have produced it.
func (t *choiceTracker) add(d llm.Delta) error {
	if d.Index < 0 || d.Index >= len(t.finished) {
		return fmt.Errorf("%w: choice index %d, want [0, %d)", errBadDelta, d.Index, len(t.finished))
	}
	if t.finished[d.Index] {
		return fmt.Errorf("%w: choice %d after its finish", errBadDelta, d.Index)
	}
	if d.FinishReason != "" {
		t.finished[d.Index] = true
		t.left--
	}
	return nil
}

// done returns an error unless every choice has finished.
func (t *choiceTracker) done() error {
	if t.left > 0 {
		return fmt.Errorf("%w: %d of %d choices unfinished", errIncompleteStream, t.left, len(t.finished))
	}
	return nil
}

// abortNext finishes the first unfinished choice with "abort", or reports that none is left.
func (t *choiceTracker) abortNext() (llm.Delta, bool) {
	for i, f := range t.finished {
		if !f {
			d := llm.Delta{Index: i, FinishReason: "abort"}
			_ = t.add(d)
			return d, true
		}
	}
	return llm.Delta{}, false
}
