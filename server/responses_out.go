package server

import (
	"encoding/json"

	"github.com/govllm/govllm/llm"
)

// Id prefixes of a response and its output items, as OpenAI's.
const (
	messageIDPrefix   = "msg_"
	functionIDPrefix  = "fc_"
	reasoningIDPrefix = "rs_"
)

// Statuses of a response and of its output items.
const (
	statusInProgress = "in_progress"
	statusCompleted  = "completed"
	statusIncomplete = "incomplete"
	statusFailed     = "failed"
)

// responseObject is a response ("object": "response"): the body of a non-streamed answer and
// the snapshot that the lifecycle events of a stream carry. The request's parameters are
// echoed as OpenAI does.
type responseObject struct {
	ID                 string             `json:"id"`
	Object             string             `json:"object"`
	CreatedAt          int64              `json:"created_at"`
	Status             string             `json:"status"`
	Background         bool               `json:"background"`
	Error              *responseError     `json:"error"`
	IncompleteDetails  *incompleteDetails `json:"incomplete_details"`
	Instructions       *string            `json:"instructions"`
	MaxOutputTokens    *int               `json:"max_output_tokens"`
	MaxToolCalls       *int               `json:"max_tool_calls"`
	Model              string             `json:"model"`
	Output             []*outputItem      `json:"output"`
	ParallelToolCalls  bool               `json:"parallel_tool_calls"`
	PreviousResponseID *string            `json:"previous_response_id"`
	Reasoning          reasoningEcho      `json:"reasoning"`
	ServiceTier        string             `json:"service_tier"`
	Store              bool               `json:"store"`
	Temperature        *float64           `json:"temperature"`
	Text               textEcho           `json:"text"`
	ToolChoice         json.RawMessage    `json:"tool_choice"`
	Tools              []json.RawMessage  `json:"tools"`
	TopLogprobs        int                `json:"top_logprobs"`
	TopP               *float64           `json:"top_p"`
	Truncation         string             `json:"truncation"`
	Usage              *responseUsage     `json:"usage"`
	User               *string            `json:"user"`
	Metadata           map[string]string  `json:"metadata"`
}

// responseError is a failed response's error.
type responseError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// incompleteDetails says why a response is incomplete; Reason is "max_output_tokens", or
// absent when the server aborted the request (timeout, shutdown).
type incompleteDetails struct {
	Reason string `json:"reason,omitempty"`
}

// reasoningEcho is the response's "reasoning": always nulls (see responsesReason).
type reasoningEcho struct {
	Effort  *string `json:"effort"`
	Summary *string `json:"summary"`
}

// textEcho is the response's "text".
type textEcho struct {
	Format json.RawMessage `json:"format"`
}

// responseUsage is a response's token count.
type responseUsage struct {
	InputTokens         int                 `json:"input_tokens"`
	InputTokensDetails  inputTokensDetails  `json:"input_tokens_details"`
	OutputTokens        int                 `json:"output_tokens"`
	OutputTokensDetails outputTokensDetails `json:"output_tokens_details"`
	TotalTokens         int                 `json:"total_tokens"`
}

// inputTokensDetails are always zero: the engine reports no prefix-cache hits per request.
type inputTokensDetails struct {
	CachedTokens     int `json:"cached_tokens"`
	CacheWriteTokens int `json:"cache_write_tokens"`
}

// outputTokensDetails are always zero: the engine does not count reasoning tokens apart.
type outputTokensDetails struct {
	ReasoningTokens int `json:"reasoning_tokens"`
}

func toResponseUsage(u usage) *responseUsage {
	return &responseUsage{InputTokens: u.PromptTokens, OutputTokens: u.CompletionTokens, TotalTokens: u.TotalTokens}
}

// outputItem is an element of a response's output: a message (Role, Content of output_text
// parts), a reasoning item (Summary, Content of reasoning_text parts) or a function_call
// (CallID, Name, Arguments).
type outputItem struct {
	Type      string         `json:"type"`
	ID        string         `json:"id"`
	Status    string         `json:"status"`
	Role      string         `json:"role,omitempty"`
	Summary   *[]contentPart `json:"summary,omitempty"`
	Content   *[]outputPart  `json:"content,omitempty"`
	CallID    string         `json:"call_id,omitempty"`
	Name      string         `json:"name,omitempty"`
	Arguments *string        `json:"arguments,omitempty"`
}

// outputPart is a content part of an output item: output_text (with its annotations, always
// none, and logprobs, never asked for) or reasoning_text.
type outputPart struct {
	Type        string    `json:"type"`
	Text        string    `json:"text"`
	Annotations *[]string `json:"annotations,omitempty"`
	Logprobs    *[]string `json:"logprobs,omitempty"`
}

func newTextPart(text string) outputPart {
	return outputPart{Type: "output_text", Text: text, Annotations: &[]string{}, Logprobs: &[]string{}}
}

func newReasoningPart(text string) outputPart {
	return outputPart{Type: "reasoning_text", Text: text}
}

func newMessageItem(id, status, text string) *outputItem {
	return &outputItem{Type: "message", ID: id, Status: status, Role: assistantRole,
		Content: &[]outputPart{newTextPart(text)}}
}

func newReasoningItem(id, status, text string) *outputItem {
	return &outputItem{Type: "reasoning", ID: id, Status: status, Summary: &[]contentPart{},
		Content: &[]outputPart{newReasoningPart(text)}}
}

func newFunctionCallItem(id, status string, tc llm.ToolCall) *outputItem {
	args := tc.Function.Arguments
	return &outputItem{Type: "function_call", ID: id, Status: status, CallID: tc.ID,
		Name: tc.Function.Name, Arguments: &args}
}

// responsesFormat writes Responses answers. It holds the request's echoed parameters.
type responsesFormat struct {
	echo responseObject // the parameters; the rest is filled per answer
}

// newResponsesFormat keeps the parameters of b that a response echoes.
func newResponsesFormat(b *responsesRequest) *responsesFormat {
	e := responseObject{
		Object:            "response",
		Instructions:      b.Instructions,
		MaxOutputTokens:   b.MaxOutputTokens,
		ParallelToolCalls: b.ParallelToolCalls == nil || *b.ParallelToolCalls,
		ServiceTier:       "default",
		Temperature:       b.Temperature,
		Text:              textEcho{Format: json.RawMessage(`{"type":"text"}`)},
		ToolChoice:        json.RawMessage(`"auto"`),
		Tools:             []json.RawMessage{},
		TopP:              b.TopP,
		Truncation:        "disabled",
		Metadata:          b.Metadata,
	}
	if e.Metadata == nil {
		e.Metadata = map[string]string{}
	}
	if b.Text != nil && !isNull(b.Text.Format) {
		e.Text.Format = compactJSON(b.Text.Format)
	}
	if !isNull(b.ToolChoice) {
		e.ToolChoice = compactJSON(b.ToolChoice)
	}
	var tools []json.RawMessage
	if !isNull(b.Tools) && json.Unmarshal(b.Tools, &tools) == nil {
		for i := range tools {
			tools[i] = compactJSON(tools[i])
		}
		e.Tools = tools
	}
	if b.User != "" {
		e.User = &b.User
	}
	return &responsesFormat{echo: e}
}

// object returns the response of call c with status and output.
func (f *responsesFormat) object(c *call, status string, output []*outputItem) *responseObject {
	r := f.echo
	r.ID, r.CreatedAt, r.Model, r.Status = c.id, c.created, c.model, status
	if output == nil {
		output = []*outputItem{}
	}
	r.Output = output
	return &r
}

// finish sets the status of r from the finish reason of its output, and its usage.
func finishResponse(r *responseObject, reason string, u usage) {
	r.Status = statusCompleted
	switch reason {
	case "length":
		r.Status = statusIncomplete
		r.IncompleteDetails = &incompleteDetails{Reason: "max_output_tokens"}
	case "abort":
		r.Status = statusIncomplete
		r.IncompleteDetails = &incompleteDetails{}
	}
	r.Usage = toResponseUsage(u)
}

// itemStatus is the status of an output item of a response that finished with reason.
func itemStatus(reason string) string {
	if reason == "length" || reason == "abort" {
		return statusIncomplete
	}
	return statusCompleted
}

// writeDelta is not used: Responses streams are written by streamEvents.
func (f *responsesFormat) writeDelta(*sseWriter, *call, llm.Delta, bool) {}

// usageChunk is not used: a Responses stream carries its usage in response.completed.
func (f *responsesFormat) usageChunk(*call, usage) any { return nil }

// response is the non-streamed answer: a reasoning item if the engine split reasoning off,
// the message (unless the output is only tool calls) and a function_call item per call.
func (f *responsesFormat) response(c *call, outs []choiceOut, u usage) any {
	o := &outs[0]
	if fc := c.params.forced; fc != nil {
		// Forced tool choice: complete calls replace the text, else it stays content.
		if calls, ok := parseForced(fc, o.text, func() string { return c.newID(toolCallIDPrefix) }); ok {
			o.toolCalls, o.text = calls, ""
		}
	}
	status := itemStatus(o.reason)
	var output []*outputItem
	if o.reasoning != "" {
		output = append(output, newReasoningItem(c.newID(reasoningIDPrefix), status, o.reasoning))
	}
	if o.text != "" || len(o.toolCalls) == 0 {
		output = append(output, newMessageItem(c.newID(messageIDPrefix), status, o.text))
	}
	for _, tc := range o.toolCalls {
		output = append(output, newFunctionCallItem(c.newID(functionIDPrefix), status, tc))
	}
	r := f.object(c, statusCompleted, output)
	finishResponse(r, o.reason, u)
	return r
}
