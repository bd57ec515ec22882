package server

import (
	"errors"
	"fmt"
	"io"
	"net/http"

	"github.com/govllm/govllm/llm"
)

// A streamed message is Anthropic's event sequence: message_start (with the prompt's
// input_tokens when the stream knows them), ping, then per content block content_block_start,
// content_block_delta (text_delta, thinking_delta, or input_json_delta for tool_use) and
// content_block_stop, then message_delta (stop_reason, stop_sequence, usage) and message_stop.
// Each event is `event: <type>` and `data: <json>`. An error after the first event is an
// `event: error` in Anthropic's error shape.

// anthropicStream writes the events of one streamed message.
type anthropicStream struct {
	c  *call
	p  *anthropicParams
	sw *sseWriter

	started  bool   // message_start went out
	blocks   int    // content blocks started
	open     string // the open block's type: "", "text", "thinking" or "tool_use"
	openCall int    // the tool call index of an open tool_use block
	held     string // text that may start a stop sequence (anthropicParams.stops)
	finish   string // the engine's finish reason
	matched  string // the stop sequence that ended the text
	toolUsed bool
}

// textDeltaEvent is the per-token event, encoded without maps.
type textDeltaEvent struct {
	Type  string    `json:"type"` // "content_block_delta"
	Index int       `json:"index"`
	Delta textDelta `json:"delta"`
}

type textDelta struct {
	Type        string `json:"type"` // "text_delta", "thinking_delta" or "input_json_delta"
	Text        string `json:"text,omitempty"`
	Thinking    string `json:"thinking,omitempty"`
	PartialJSON string `json:"partial_json,omitempty"`
}

// event appends one event named name with data v.
func (a *anthropicStream) event(name string, v any) {
	a.sw.buf.WriteString("event: ")
	a.sw.buf.WriteString(name)
	a.sw.buf.WriteByte('\n')
	a.sw.writeSSE(v)
}

// start writes message_start and a ping.
func (a *anthropicStream) start() {
	a.started = true
	input := 0
	if p, ok := a.c.stream.(promptTokens); ok {
		input = len(p.PromptTokenIDs())
	}
	msg := anthropicMessageBody{ID: a.c.id, Type: "message", Role: assistantRole, Model: a.c.model,
		Content: []map[string]any{}, Usage: anthropicUsage{InputTokens: input}}
	a.event("message_start", map[string]any{"type": "message_start", "message": &msg})
	a.event("ping", map[string]string{"type": "ping"})
}

// openBlock starts a block of type kind unless one is open, closing a block of another type.
func (a *anthropicStream) openBlock(kind string, block map[string]any) {
	if a.open == kind && kind != "tool_use" {
		return
	}
	a.closeBlock()
	a.open = kind
	a.event("content_block_start", map[string]any{"type": "content_block_start", "index": a.blocks, "content_block": block})
	a.blocks++
}

// closeBlock ends the open block, if any.
func (a *anthropicStream) closeBlock() {
	if a.open == "" {
		return
	}
	a.open = ""
	a.event("content_block_stop", map[string]any{"type": "content_block_stop", "index": a.blocks - 1})
}

// delta writes the events of d.
func (a *anthropicStream) delta(d llm.Delta) error {
	if !a.started {
		a.start()
	}
	if a.c.forced != nil {
		a.c.forceDelta(&d)
	}
	if d.FinishReason != "" {
		a.finish = d.FinishReason
	}
	if a.p.thinking && d.Reasoning != "" {
		a.openBlock("thinking", map[string]any{"type": "thinking", "thinking": "", "signature": ""})
		a.event("content_block_delta", &textDeltaEvent{Type: "content_block_delta", Index: a.blocks - 1,
			Delta: textDelta{Type: "thinking_delta", Thinking: d.Reasoning}})
	}
	text := d.Text
	if len(a.p.stops) > 0 {
		text = a.held + text
		if d.FinishReason == "" {
			k := heldStop(text, a.p.stops)
			text, a.held = text[:len(text)-k], text[len(text)-k:]
		} else {
			text, a.matched = cutStop(text, d.FinishReason, a.p.stops)
			a.held = ""
		}
	}
	if text != "" {
		a.openBlock("text", map[string]any{"type": "text", "text": ""})
		a.event("content_block_delta", &textDeltaEvent{Type: "content_block_delta", Index: a.blocks - 1,
			Delta: textDelta{Type: "text_delta", Text: text}})
	}
	for _, tc := range d.ToolCalls {
		if tc.ID != "" {
			a.toolUsed = true
			a.openBlock("tool_use", map[string]any{"type": "tool_use", "id": anthropicToolID(tc.ID), "name": tc.Name, "input": map[string]any{}})
			a.openCall = tc.Index
		}
		if tc.Arguments == "" {
			continue
		}
		if a.open != "tool_use" || a.openCall != tc.Index {
			return fmt.Errorf("%w: arguments of tool call %d outside its block", errBadDelta, tc.Index)
		}
		a.event("content_block_delta", &textDeltaEvent{Type: "content_block_delta", Index: a.blocks - 1,
			Delta: textDelta{Type: "input_json_delta", PartialJSON: tc.Arguments}})
	}
	return nil
}

// end writes the last events: the open block's stop, message_delta and message_stop. A message
// without content gets an empty text block, as the non-streamed answer has.
func (a *anthropicStream) end(u usage) {
	if !a.started {
		a.start()
	}
	if a.blocks == 0 {
		a.openBlock("text", map[string]any{"type": "text", "text": ""})
	}
	a.closeBlock()
	var seq *string
	if a.matched != "" {
		seq = &a.matched
	}
	a.event("message_delta", map[string]any{
		"type":  "message_delta",
		"delta": map[string]any{"stop_reason": anthropicStopReason(a.finish, a.matched, a.toolUsed), "stop_sequence": seq},
		"usage": anthropicUsage{InputTokens: u.PromptTokens, OutputTokens: u.CompletionTokens},
	})
	a.event("message_stop", map[string]string{"type": "message_stop"})
}

// streamMessages sends the message as Anthropic's server-sent events, flushed per delta. It
// reports whether the request completed.
func (s *Server) streamMessages(w http.ResponseWriter, c *call, p *anthropicParams) bool {
	a := &anthropicStream{c: c, p: p, sw: newSSEWriter(w)}
	for {
		d, err := s.next(c)
		if errors.Is(err, io.EOF) {
			break
		}
		if err == nil {
			err = a.delta(d)
		}
		if err != nil {
			s.failMessages(w, a, err)
			return false
		}
		if err := a.sw.flush(); err != nil {
			c.log.Debug("client went away", "err", err)
			return false
		}
	}
	u := c.usage()
	a.end(u)
	if err := a.sw.flush(); err != nil {
		c.log.Debug("client went away", "err", err)
		return false
	}
	s.logDone(c, u)
	return true
}

// failMessages answers err: with an error status if nothing went out yet, else with an
// `event: error`.
func (s *Server) failMessages(w http.ResponseWriter, a *anthropicStream, err error) {
	e := toAPIError(err)
	err = fmt.Errorf("server: messages stream: %w", err)
	if !a.sw.started {
		a.sw.buf.Reset()
		s.rejectAnthropic(w, a.c, err, e)
		return
	}
	s.logFailure(a.c.log, err, e)
	if e == nil {
		return
	}
	a.event("error", e.anthropicBody())
	if err := a.sw.flush(); err != nil {
		a.c.log.Debug("client went away", "err", err)
	}
}
