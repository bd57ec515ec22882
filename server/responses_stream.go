package server

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/govllm/govllm/llm"
)

// eventStreamer is a format whose streams are not chat's chunks but their own sequence of
// named events (Responses); streamOut hands such a stream to it whole.
type eventStreamer interface {
	streamEvents(s *Server, w http.ResponseWriter, c *call) bool
}

// Streamed events of a response, each with the sequence number of its place in the stream.

type lifecycleEvent struct {
	Type           string          `json:"type"`
	SequenceNumber int             `json:"sequence_number"`
	Response       *responseObject `json:"response"`
}

type itemEvent struct {
	Type           string      `json:"type"`
	SequenceNumber int         `json:"sequence_number"`
	OutputIndex    int         `json:"output_index"`
	Item           *outputItem `json:"item"`
}

type partEvent struct {
	Type           string     `json:"type"`
	SequenceNumber int        `json:"sequence_number"`
	ItemID         string     `json:"item_id"`
	OutputIndex    int        `json:"output_index"`
	ContentIndex   int        `json:"content_index"`
	Part           outputPart `json:"part"`
}

// textEvent is response.output_text.delta/done (Logprobs set, always empty) and
// response.reasoning_text.delta/done.
type textEvent struct {
	Type           string    `json:"type"`
	SequenceNumber int       `json:"sequence_number"`
	ItemID         string    `json:"item_id"`
	OutputIndex    int       `json:"output_index"`
	ContentIndex   int       `json:"content_index"`
	Delta          *string   `json:"delta,omitempty"`
	Text           *string   `json:"text,omitempty"`
	Logprobs       *[]string `json:"logprobs,omitempty"`
}

type argumentsEvent struct {
	Type           string  `json:"type"`
	SequenceNumber int     `json:"sequence_number"`
	ItemID         string  `json:"item_id"`
	OutputIndex    int     `json:"output_index"`
	Delta          *string `json:"delta,omitempty"`
	Name           string  `json:"name,omitempty"`
	Arguments      *string `json:"arguments,omitempty"`
}

type errorEvent struct {
	Type           string  `json:"type"`
	SequenceNumber int     `json:"sequence_number"`
	Code           string  `json:"code"`
	Message        string  `json:"message"`
	Param          *string `json:"param"`
}

// responseStream turns the deltas of a response into its events. Output items are streamed
// one at a time: reasoning, text and each tool call open their own item, closing the one
// before.
type responseStream struct {
	f      *responsesFormat
	c      *call
	sw     *sseWriter
	seq    int
	output []*outputItem
	open   *outputItem     // the item being streamed, nil between items
	text   strings.Builder // the open item's text or arguments
	calls  map[int]*outputItem
	sawMsg bool
	reason string
}

// event appends one named event.
func (rs *responseStream) event(typ string, v any) {
	rs.sw.buf.WriteString("event: ")
	rs.sw.buf.WriteString(typ)
	rs.sw.buf.WriteByte('\n')
	rs.sw.writeSSE(v)
	rs.seq++
}

func (rs *responseStream) lifecycle(typ string, r *responseObject) {
	rs.event(typ, &lifecycleEvent{Type: typ, SequenceNumber: rs.seq, Response: r})
}

// start writes response.created and response.in_progress.
func (rs *responseStream) start() {
	r := rs.f.object(rs.c, statusInProgress, nil)
	rs.lifecycle("response.created", r)
	rs.lifecycle("response.in_progress", r)
}

// openItem closes the open item and opens it.
func (rs *responseStream) openItem(it *outputItem) {
	rs.closeItem(statusCompleted)
	rs.open = it
	rs.text.Reset()
	idx := len(rs.output)
	rs.output = append(rs.output, it)
	// The added item is empty; its content part goes out in its own event.
	content := it.Content
	if content != nil {
		it.Content = &[]outputPart{}
	}
	rs.event("response.output_item.added", &itemEvent{Type: "response.output_item.added", SequenceNumber: rs.seq, OutputIndex: idx, Item: it})
	if content != nil {
		it.Content = content
		rs.event("response.content_part.added", &partEvent{Type: "response.content_part.added", SequenceNumber: rs.seq,
			ItemID: it.ID, OutputIndex: idx, Part: (*content)[0]})
	}
}

// closeItem finishes the open item, if any, with status.
func (rs *responseStream) closeItem(status string) {
	it := rs.open
	if it == nil {
		return
	}
	rs.open = nil
	idx := len(rs.output) - 1
	text := rs.text.String()
	it.Status = status
	switch it.Type {
	case "message", "reasoning":
		typ, part := "response.output_text.done", newTextPart(text)
		var lps *[]string
		if it.Type == "reasoning" {
			typ, part = "response.reasoning_text.done", newReasoningPart(text)
		} else {
			lps = &[]string{}
		}
		rs.event(typ, &textEvent{Type: typ, SequenceNumber: rs.seq, ItemID: it.ID, OutputIndex: idx, Text: &text, Logprobs: lps})
		rs.event("response.content_part.done", &partEvent{Type: "response.content_part.done", SequenceNumber: rs.seq,
			ItemID: it.ID, OutputIndex: idx, Part: part})
		(*it.Content)[0] = part
	case "function_call":
		it.Arguments = &text
		rs.event("response.function_call_arguments.done", &argumentsEvent{Type: "response.function_call_arguments.done",
			SequenceNumber: rs.seq, ItemID: it.ID, OutputIndex: idx, Name: it.Name, Arguments: &text})
	}
	rs.event("response.output_item.done", &itemEvent{Type: "response.output_item.done", SequenceNumber: rs.seq, OutputIndex: idx, Item: it})
}

// textDelta streams an increment of text (message) or reasoning.
func (rs *responseStream) textDelta(kind, delta string) {
	if rs.open == nil || rs.open.Type != kind {
		if kind == "message" {
			rs.sawMsg = true
			rs.openItem(newMessageItem(rs.c.newID(messageIDPrefix), statusInProgress, ""))
		} else {
			rs.openItem(newReasoningItem(rs.c.newID(reasoningIDPrefix), statusInProgress, ""))
		}
	}
	rs.text.WriteString(delta)
	typ, lps := "response.output_text.delta", &[]string{}
	if kind == "reasoning" {
		typ, lps = "response.reasoning_text.delta", nil
	}
	rs.event(typ, &textEvent{Type: typ, SequenceNumber: rs.seq, ItemID: rs.open.ID,
		OutputIndex: len(rs.output) - 1, Delta: &delta, Logprobs: lps})
}

// toolDelta streams a piece of a tool call.
func (rs *responseStream) toolDelta(p llm.ToolCallDelta) {
	it := rs.calls[p.Index]
	if it == nil {
		empty := ""
		it = &outputItem{Type: "function_call", ID: rs.c.newID(functionIDPrefix), Status: statusInProgress,
			CallID: p.ID, Name: p.Name, Arguments: &empty}
		rs.calls[p.Index] = it
		rs.openItem(it)
	}
	if p.Arguments == "" {
		return
	}
	if it != rs.open {
		// A piece of a call already closed (parsers stream calls in order): it can only join
		// the call's final arguments.
		args := *it.Arguments + p.Arguments
		it.Arguments = &args
		return
	}
	rs.text.WriteString(p.Arguments)
	rs.event("response.function_call_arguments.delta", &argumentsEvent{Type: "response.function_call_arguments.delta",
		SequenceNumber: rs.seq, ItemID: it.ID, OutputIndex: len(rs.output) - 1, Delta: &p.Arguments})
}

// add streams the events of d.
func (rs *responseStream) add(d llm.Delta) {
	if d.Reasoning != "" {
		rs.textDelta("reasoning", d.Reasoning)
	}
	if d.Text != "" {
		rs.textDelta("message", d.Text)
	}
	for _, p := range d.ToolCalls {
		rs.toolDelta(p)
	}
	if d.FinishReason != "" {
		rs.reason = d.FinishReason
	}
}

// finish closes the output and writes response.completed (or response.incomplete).
func (rs *responseStream) finish(u usage) {
	status := itemStatus(rs.reason)
	if !rs.sawMsg && len(rs.calls) == 0 {
		// No text and no calls: an empty message, as the non-streamed answer has.
		rs.sawMsg = true
		rs.openItem(newMessageItem(rs.c.newID(messageIDPrefix), statusInProgress, ""))
	}
	rs.closeItem(status)
	r := rs.f.object(rs.c, statusCompleted, rs.output)
	finishResponse(r, rs.reason, u)
	typ := "response.completed"
	if r.Status == statusIncomplete {
		typ = "response.incomplete"
	}
	rs.lifecycle(typ, r)
}

// fail writes an error event and response.failed.
func (rs *responseStream) fail(e *apiError) {
	code := "server_error"
	if e.Status < 500 {
		code = "invalid_request_error"
	}
	ev := &errorEvent{Type: "error", SequenceNumber: rs.seq, Code: code, Message: e.Message}
	if e.Param != "" {
		ev.Param = &e.Param
	}
	rs.event("error", ev)
	r := rs.f.object(rs.c, statusFailed, rs.output)
	r.Error = &responseError{Code: code, Message: e.Message}
	rs.lifecycle("response.failed", r)
}

// streamEvents sends the response as OpenAI's event sequence, flushed per delta. Nothing goes
// out before the first delta, so a request the engine refuses (a prompt too long) still gets
// its 4xx status. It reports whether the request completed.
func (f *responsesFormat) streamEvents(s *Server, w http.ResponseWriter, c *call) bool {
	rs := &responseStream{f: f, c: c, sw: newSSEWriter(w), calls: make(map[int]*outputItem)}
	started := false
	for {
		d, err := s.next(c)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			e := toAPIError(err)
			err = fmt.Errorf("server: responses stream: %w", err)
			if !started {
				s.reject(w, c.log, err, e)
				return false
			}
			s.logFailure(c.log, err, e)
			if e != nil {
				rs.fail(e)
				if err := rs.sw.flush(); err != nil {
					c.log.Debug("client went away", "err", err)
				}
			}
			return false
		}
		if c.forced != nil {
			c.forceDelta(&d)
		}
		if !started {
			started = true
			rs.start()
		}
		rs.add(d)
		if err := rs.sw.flush(); err != nil {
			c.log.Debug("client went away", "err", err)
			return false
		}
	}
	u := c.usage()
	if !started {
		rs.start()
	}
	rs.finish(u)
	if err := rs.sw.flush(); err != nil {
		c.log.Debug("client went away", "err", err)
		return false
	}
	s.logDone(c, u)
	return true
}
