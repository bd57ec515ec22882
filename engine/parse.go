package engine

import (
	"encoding/json"
	"strings"
)

// Output parsing (Request.Parsing): a request that asks for tool-call or reasoning parsing has
// each choice's detokenized output sent back to the backend's parsers (vLLM's parser library,
// in Python) with cmdParse, and delivers what evParsed answers: content in Delta.Text,
// Delta.Reasoning and Delta.ToolCalls. A streamed request sends every delta as it comes; a
// non-streamed one sends each choice's whole text once it finished (vLLM's non-streaming
// parse). Replies come back in the order sent, so each choice keeps a FIFO of what a reply
// completes (tokens, logprobs, finish reason). A request's END waits for its last reply. Only
// requests that set Parsing pay for this round trip; the others keep the direct token path.

// parseState is the poller-only parsing state of one request.
type parseState struct {
	streamed    bool
	choices     []parseChoice
	outstanding int    // cmdParse sent, evParsed not yet received
	end         *Usage // the END that arrived while replies were outstanding
}

// parseChoice is one choice's side of the round trip.
type parseChoice struct {
	queue       []Delta // sent, awaiting their replies: tokens, logprobs and finish reason
	whole       strings.Builder
	wholeDelta  Delta // non-streamed: the tokens and logprobs gathered until the finish
	toolsCalled bool
}

// parseCommand is cmdParse's payload (the bridge's _on_parse).
type parseCommand struct {
	Index    int     `json:"index"`
	Text     string  `json:"text"`
	TokenIDs []int32 `json:"token_ids"`
	Finished bool    `json:"finished"`
	Whole    bool    `json:"whole"`
}

// parsedEvent is evParsed's meta.
type parsedEvent struct {
	Index       int              `json:"index"`
	Content     *string          `json:"content"`
	Reasoning   *string          `json:"reasoning"`
	ToolCalls   []parsedToolCall `json:"tool_calls"`
	ToolsCalled bool             `json:"tools_called"`
}

type parsedToolCall struct {
	Index     int     `json:"index"`
	ID        *string `json:"id"`
	Type      *string `json:"type"`
	Name      *string `json:"name"`
	Arguments *string `json:"arguments"`
}

func (p *parseState) choice(index int) *parseChoice {
	for len(p.choices) <= index {
		p.choices = append(p.choices, parseChoice{})
	}
	return &p.choices[index]
}

// deliver routes a detokenized delta of a parsing request: to the parsers, or (non-streamed,
// unfinished) into the choice's gathered output.
func (s *Stream) deliverParsed(d Delta) {
	p := s.parse
	c := p.choice(d.Index)
	cmd := parseCommand{Index: d.Index, Text: d.Text, TokenIDs: d.TokenIDs, Finished: d.FinishReason != ""}
	if !p.streamed {
		c.whole.WriteString(d.Text)
		w := &c.wholeDelta
		w.Index = d.Index
		w.TokenIDs = append(w.TokenIDs, d.TokenIDs...)
		w.Logprobs = append(w.Logprobs, d.Logprobs...)
		if d.FinishReason == "" {
			return
		}
		w.FinishReason = d.FinishReason
		w.StopReason = d.StopReason
		d = *w
		cmd = parseCommand{Index: d.Index, Text: c.whole.String(), TokenIDs: d.TokenIDs, Finished: true, Whole: true}
		c.whole.Reset()
	}
	data, err := json.Marshal(&cmd)
	if err == nil && s.e.api.send(cmdParse, s.id, &data[0], int64(len(data))) == 0 {
		d.Text = "" // the reply's content replaces it
		c.queue = append(c.queue, d)
		p.outstanding++
		return
	}
	// The bridge is gone: deliver the text unparsed (the engine is dying anyway).
	s.push(d)
}

// onParsed delivers a reply: the oldest queued delta of its choice, with the parsed text. It
// reports whether the request's END was waiting for it.
func (s *Stream) onParsed(meta []byte) (ended bool) {
	p := s.parse
	if p == nil || p.outstanding == 0 {
		return false
	}
	var m parsedEvent
	if err := json.Unmarshal(meta, &m); err != nil || m.Index < 0 || m.Index >= len(p.choices) ||
		len(p.choices[m.Index].queue) == 0 {
		s.e.log.Error("engine: bad parsed event", "request", s.id, "meta", string(meta))
		return false
	}
	p.outstanding--
	c := &p.choices[m.Index]
	d := c.queue[0]
	c.queue = c.queue[1:]
	if m.Content != nil {
		d.Text = *m.Content
	}
	if m.Reasoning != nil {
		d.Reasoning = *m.Reasoning
	}
	for _, tc := range m.ToolCalls {
		d.ToolCalls = append(d.ToolCalls, ToolCallDelta{Index: tc.Index, ID: deref(tc.ID), Type: deref(tc.Type),
			Name: deref(tc.Name), Arguments: deref(tc.Arguments)})
	}
	c.toolsCalled = c.toolsCalled || m.ToolsCalled || len(d.ToolCalls) > 0
	if d.FinishReason == "stop" && c.toolsCalled {
		d.FinishReason = "tool_calls" // as vLLM reports a choice whose tool calls were parsed
	}
	if d.Text != "" || d.Reasoning != "" || len(d.ToolCalls) > 0 || d.FinishReason != "" || len(d.TokenIDs) > 0 {
		if !s.push(d) {
			s.e.abort(s.id)
		}
	}
	return p.outstanding == 0 && p.end != nil
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}
