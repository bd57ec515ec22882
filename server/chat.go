package server

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/govllm/govllm/engine"
)

// chatChunk is one streamed event of a chat completion ("chat.completion.chunk").
type chatChunk struct {
	ID      string        `json:"id"`
	Object  string        `json:"object"`
	Created int64         `json:"created"`
	Model   string        `json:"model"`
	Choices []chunkChoice `json:"choices"`
	Usage   *usage        `json:"usage,omitempty"`
}

type chunkChoice struct {
	Index        int        `json:"index"`
	Delta        chunkDelta `json:"delta"`
	Logprobs     *struct{}  `json:"logprobs"` // always null
	FinishReason *string    `json:"finish_reason"`
}

// chunkDelta is {"role":"assistant","content":""} in the role chunk, {"content":"…"} in a
// content chunk and {} in the finish chunk.
type chunkDelta struct {
	Role    string  `json:"role,omitempty"`
	Content *string `json:"content,omitempty"`
}

type usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

func toUsage(u engine.Usage) usage {
	return usage{PromptTokens: u.PromptTokens, CompletionTokens: u.CompletionTokens, TotalTokens: u.TotalTokens()}
}

// chatCompletion is the body of a non-streamed chat completion ("chat.completion").
type chatCompletion struct {
	ID                string             `json:"id"`
	Object            string             `json:"object"`
	Created           int64              `json:"created"`
	Model             string             `json:"model"`
	Choices           []completionChoice `json:"choices"`
	Usage             usage              `json:"usage"`
	SystemFingerprint string             `json:"system_fingerprint"`
}

type completionChoice struct {
	Index        int              `json:"index"`
	Message      assistantMessage `json:"message"`
	Logprobs     *struct{}        `json:"logprobs"` // always null
	FinishReason string           `json:"finish_reason"`
}

type assistantMessage struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

const assistantRole = "assistant"

// chatCall is one chat completion in flight.
type chatCall struct {
	id          string
	created     int64
	model       string
	fingerprint string
	params      chatParams
	stream      TokenStream
	log         *slog.Logger
	start       time.Time
}

// handleChat serves POST /v1/chat/completions.
func (s *Server) handleChat(w http.ResponseWriter, r *http.Request) {
	start := s.now()
	var body chatRequest
	if e := readJSON(w, r, s.maxBodyBytes, &body); e != nil {
		s.reject(w, s.log, e, e)
		return
	}
	info := s.backend.Model()
	req, params, e := body.toEngine(info)
	if e != nil {
		s.reject(w, s.log, e, e)
		return
	}
	req.ID = s.newID("chatcmpl-")
	log := s.log.With("request_id", req.ID)

	stream, err := s.backend.Generate(r.Context(), req)
	if err != nil {
		s.reject(w, log, fmt.Errorf("server: generate: %w", err), toAPIError(err))
		return
	}
	defer stream.Close()
	s.running.Add(1)
	defer s.running.Add(-1)

	c := &chatCall{
		id:          req.ID,
		created:     start.Unix(),
		model:       info.ID,
		fingerprint: fingerprint(info),
		params:      params,
		stream:      stream,
		log:         log,
		start:       start,
	}
	if params.stream {
		s.streamChat(w, c)
	} else {
		s.completeChat(w, c)
	}
}

// fingerprint is the system_fingerprint of responses: the engine that produced them.
func fingerprint(info engine.ModelInfo) string {
	if info.Backend == "" {
		return "govllm"
	}
	return "govllm-" + info.Backend
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
func (t *choiceTracker) add(d engine.Delta) error {
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

// completeChat collects the whole output and answers with one chat.completion object.
func (s *Server) completeChat(w http.ResponseWriter, c *chatCall) {
	n := c.params.n
	texts := make([]strings.Builder, n)
	reasons := make([]string, n)
	track := newChoiceTracker(n)
	for {
		d, err := c.stream.Recv()
		if errors.Is(err, io.EOF) {
			err = track.done()
			if err == nil {
				break
			}
		} else if err == nil {
			err = track.add(d)
		}
		if err != nil {
			s.reject(w, c.log, fmt.Errorf("server: chat completion: %w", err), toAPIError(err))
			return
		}
		texts[d.Index].WriteString(d.Text)
		if d.FinishReason != "" {
			reasons[d.Index] = d.FinishReason
		}
	}
	u := toUsage(c.stream.Usage())
	resp := chatCompletion{
		ID:                c.id,
		Object:            "chat.completion",
		Created:           c.created,
		Model:             c.model,
		Choices:           make([]completionChoice, n),
		Usage:             u,
		SystemFingerprint: c.fingerprint,
	}
	for i := range resp.Choices {
		resp.Choices[i] = completionChoice{
			Index:        i,
			Message:      assistantMessage{Role: assistantRole, Content: texts[i].String()},
			FinishReason: reasons[i],
		}
	}
	writeJSON(w, http.StatusOK, resp)
	s.logDone(c, u)
}

// streamChat sends the output as server-sent events: per choice a role chunk with its first
// output, content chunks, and a separate finish chunk; then the usage chunk if asked for, and
// [DONE]. Deltas with no text and no finish reason are skipped.
func (s *Server) streamChat(w http.ResponseWriter, c *chatCall) {
	sw := newSSEWriter(w)
	chunk := chatChunk{ID: c.id, Object: "chat.completion.chunk", Created: c.created, Model: c.model}
	var one [1]chunkChoice
	emit := func(index int, delta chunkDelta, finish *string) {
		one[0] = chunkChoice{Index: index, Delta: delta, FinishReason: finish}
		chunk.Choices = one[:]
		sw.writeSSE(&chunk)
	}
	empty := ""
	sent := make([]bool, c.params.n) // whether the choice's role chunk went out
	track := newChoiceTracker(c.params.n)
	for {
		d, err := c.stream.Recv()
		if errors.Is(err, io.EOF) {
			err = track.done()
			if err == nil {
				break
			}
		} else if err == nil {
			err = track.add(d)
		}
		if err != nil {
			s.failStream(w, sw, c, err)
			return
		}
		if d.Text == "" && d.FinishReason == "" {
			continue
		}
		if !sent[d.Index] {
			sent[d.Index] = true
			emit(d.Index, chunkDelta{Role: assistantRole, Content: &empty}, nil)
		}
		if d.Text != "" {
			emit(d.Index, chunkDelta{Content: &d.Text}, nil)
		}
		if d.FinishReason != "" {
			emit(d.Index, chunkDelta{}, &d.FinishReason)
		}
		if err := sw.flush(); err != nil {
			c.log.Debug("client went away", "err", err)
			return
		}
	}
	u := toUsage(c.stream.Usage())
	if c.params.includeUsage {
		chunk.Choices = []chunkChoice{}
		chunk.Usage = &u
		sw.writeSSE(&chunk)
	}
	sw.writeDone()
	if err := sw.flush(); err != nil {
		c.log.Debug("client went away", "err", err)
		return
	}
	s.logDone(c, u)
}

// failStream answers err: with an error status if nothing was sent yet, else with an SSE error
// event followed by [DONE].
func (s *Server) failStream(w http.ResponseWriter, sw *sseWriter, c *chatCall, err error) {
	e := toAPIError(err)
	err = fmt.Errorf("server: chat completion stream: %w", err)
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

func (s *Server) logDone(c *chatCall, u usage) {
	c.log.Debug("chat completion done",
		"stream", c.params.stream,
		"n", c.params.n,
		"prompt_tokens", u.PromptTokens,
		"completion_tokens", u.CompletionTokens,
		"duration", s.now().Sub(c.start))
}
