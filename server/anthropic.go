package server

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"unicode/utf8"

	"github.com/govllm/govllm/llm"
)

// Anthropic's Messages API: POST /v1/messages and POST /v1/messages/count_tokens.
//
// A request becomes a chat llm.Request: system first, then the messages, tool_use blocks as
// the assistant's ToolCalls and tool_result blocks as "tool" messages. Tools and tool_choice go
// through tools.go (auto → the engine's parser; any and tool → a forced choice that
// forcedcall.go turns into calls). Errors on these routes have Anthropic's shape,
// {"type":"error","error":{"type","message"}}, with the field named in the message.

// anthropicMaxTemperature is Anthropic's bound on temperature.
const anthropicMaxTemperature = 1.0

// anthropicToolIDPrefix starts the id of every tool_use block.
const anthropicToolIDPrefix = "toolu_"

// anthropicRequest is the body of POST /v1/messages (and, without max_tokens, of count_tokens).
type anthropicRequest struct {
	Model         string             `json:"model"`
	MaxTokens     *int               `json:"max_tokens"`
	Messages      []anthropicMessage `json:"messages"`
	System        json.RawMessage    `json:"system"`
	StopSequences []string           `json:"stop_sequences"`
	Temperature   *float64           `json:"temperature"`
	TopP          *float64           `json:"top_p"`
	TopK          *int               `json:"top_k"`
	Stream        bool               `json:"stream"`
	Tools         []json.RawMessage  `json:"tools"`
	ToolChoice    json.RawMessage    `json:"tool_choice"`
	Metadata      json.RawMessage    `json:"metadata"`
	ServiceTier   *string            `json:"service_tier"`
	Thinking      json.RawMessage    `json:"thinking"`
	CacheControl  json.RawMessage    `json:"cache_control"`
}

// anthropicFields are the fields the server implements (or accepts as hints: metadata,
// service_tier, cache_control). count_tokens takes a subset (anthropicCountFields).
var anthropicFields = []string{"model", "max_tokens", "messages", "system", "stop_sequences",
	"temperature", "top_p", "top_k", "stream", "tools", "tool_choice", "metadata", "service_tier",
	"thinking", "cache_control"}

var anthropicCountFields = []string{"model", "messages", "system", "tools", "tool_choice",
	"thinking", "cache_control"}

// anthropicMessage is one element of "messages": content is a string or an array of blocks.
type anthropicMessage struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
}

// anthropicBlock is a content block of a message (or of a tool_result's content).
type anthropicBlock struct {
	Type         string          `json:"type"`
	Text         *string         `json:"text"`
	ID           string          `json:"id"`
	Name         string          `json:"name"`
	Input        json.RawMessage `json:"input"`
	ToolUseID    string          `json:"tool_use_id"`
	Content      json.RawMessage `json:"content"`
	IsError      *bool           `json:"is_error"`
	CacheControl json.RawMessage `json:"cache_control"`
	Citations    json.RawMessage `json:"citations"`
}

// anthropicTool is an element of "tools": a client tool.
type anthropicTool struct {
	Type         *string         `json:"type"`
	Name         string          `json:"name"`
	Description  *string         `json:"description"`
	InputSchema  json.RawMessage `json:"input_schema"`
	CacheControl json.RawMessage `json:"cache_control"`
}

var anthropicToolFields = []string{"type", "name", "description", "input_schema", "cache_control"}

// anthropicToolChoice is "tool_choice".
type anthropicToolChoice struct {
	Type                   string  `json:"type"`
	Name                   *string `json:"name"`
	DisableParallelToolUse *bool   `json:"disable_parallel_tool_use"`
}

// anthropicParams are what the server itself does with an Anthropic request.
type anthropicParams struct {
	callParams
	// stops are the stop_sequences when the server finds which one matched (plain text
	// output: the engine keeps the matched string in the text and the server cuts it off).
	stops []string
	// thinking: reasoning parsed by the engine goes out as thinking blocks (else it is dropped).
	thinking bool
}

// decodeAnthropic reads the body into req, refusing fields outside allowed with a 400 naming them.
func decodeAnthropic(w http.ResponseWriter, r *http.Request, limit int64, allowed []string, req *anthropicRequest) *apiError {
	var raw json.RawMessage
	if e := readJSON(w, r, limit, &raw); e != nil {
		return e
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil || fields == nil {
		return badRequest("", "The request body must be a JSON object.")
	}
	keys := make([]string, 0, len(fields))
	for k := range fields {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if !slices.Contains(allowed, k) {
			if slices.Contains(anthropicFields, k) {
				return badRequest(k, "%s: this field is not accepted by this route.", k)
			}
			return badRequest(k, "%s: this field is not supported by this server.", k)
		}
	}
	if err := json.Unmarshal(raw, req); err != nil {
		if te, ok := errors.AsType[*json.UnmarshalTypeError](err); ok {
			return badRequest(te.Field, "%s: invalid type: expected %s, got JSON %s.",
				te.Field, describeType(te.Type), te.Value)
		}
		return badRequest("", "Malformed JSON body: %v.", err)
	}
	return nil
}

// checkKeys answers a 400 naming the first key of the object raw that is not in allowed.
func checkKeys(param string, raw json.RawMessage, allowed []string) *apiError {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		return badRequest(param, "%s must be an object.", param)
	}
	keys := make([]string, 0, len(fields))
	for k := range fields {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if !slices.Contains(allowed, k) {
			return badRequest(param+"."+k, "%s.%s: this field is not supported.", param, k)
		}
	}
	return nil
}

// toEngine validates a against the served model into a chat request. counting says it is a
// count_tokens request (no max_tokens, no sampling).
func (a *anthropicRequest) toEngine(m llm.ModelInfo, counting bool) (llm.Request, anthropicParams, *apiError) {
	var req llm.Request
	p := anthropicParams{callParams: callParams{n: 1, stream: a.Stream}}
	if a.Model == "" {
		return req, p, badRequest("model", "model: field required.")
	}
	if e := checkModel(a.Model, m); e != nil {
		return req, p, e
	}
	req.Adapter = adapterFor(a.Model, m)
	if !counting {
		if a.MaxTokens == nil {
			return req, p, badRequest("max_tokens", "max_tokens: field required.")
		}
		if e := checkMaxTokens("max_tokens", *a.MaxTokens, m.MaxModelLen); e != nil {
			return req, p, e
		}
		req.Sampling.MaxTokens = *a.MaxTokens
	}
	if e := checkCacheControl("cache_control", a.CacheControl); e != nil {
		return req, p, e
	}
	msgs, e := a.conversation()
	if e != nil {
		return req, p, e
	}
	req.Messages = msgs
	if last := msgs[len(msgs)-1]; last.Role == "assistant" {
		// A prefilled assistant turn: the model continues it, and the answer is the continuation
		// (Anthropic's semantics), as vLLM's continue_final_message renders it.
		req.Chat = &llm.ChatOptions{ContinueFinalMessage: true}
	}
	if e := a.sampling(&req.Sampling, &p); e != nil {
		return req, p, e
	}
	if e := a.applyThinking(&req, &p, m); e != nil {
		return req, p, e
	}
	if e := a.applyTools(&req, &p, m); e != nil {
		return req, p, e
	}
	if len(p.stops) > 0 && (req.Parsing != nil || p.forced != nil) {
		// Parsed or forced output is not the text as generated: the engine drops the matched
		// string as usual and the stop_reason of a stop string is "end_turn".
		p.stops = nil
	}
	if len(p.stops) > 0 {
		req.Sampling.IncludeStopStrInOutput = true
	}
	return req, p, nil
}

// sampling validates stop_sequences, temperature, top_p, top_k, metadata and service_tier.
func (a *anthropicRequest) sampling(sp *llm.SamplingParams, p *anthropicParams) *apiError {
	if len(a.StopSequences) > maxStopStrings {
		return badRequest("stop_sequences", "stop_sequences: at most %d strings, got %d.", maxStopStrings, len(a.StopSequences))
	}
	for i, s := range a.StopSequences {
		if s == "" {
			return badRequest(fmt.Sprintf("stop_sequences[%d]", i), "stop_sequences[%d]: must not be empty.", i)
		}
	}
	sp.Stop = a.StopSequences
	p.stops = a.StopSequences
	if t := a.Temperature; t != nil {
		if !(*t >= 0 && *t <= anthropicMaxTemperature) {
			return badRequest("temperature", "temperature: must be in [0, 1], got %v.", *t)
		}
		sp.Temperature = t
	}
	if t := a.TopP; t != nil {
		if !(*t > 0 && *t <= 1) {
			return badRequest("top_p", "top_p: must be in (0, 1], got %v.", *t)
		}
		sp.TopP = t
	}
	if k := a.TopK; k != nil {
		if *k < 0 {
			return badRequest("top_k", "top_k: must be at least 0 (0 is off), got %d.", *k)
		}
		sp.TopK = k
	}
	if !isNull(a.Metadata) {
		if e := checkKeys("metadata", a.Metadata, []string{"user_id"}); e != nil {
			return e
		}
		var md struct {
			UserID *string `json:"user_id"`
		}
		if err := json.Unmarshal(a.Metadata, &md); err != nil {
			return badRequest("metadata.user_id", "metadata.user_id: must be a string or null.")
		}
	}
	if t := a.ServiceTier; t != nil && *t != "auto" && *t != "standard_only" {
		return badRequest("service_tier", "service_tier: must be \"auto\" or \"standard_only\", got %q.", *t)
	}
	return nil
}

// checkCacheControl accepts a cache_control hint: {"type":"ephemeral"} with an optional ttl.
// The engine caches prompt prefixes by itself, so the hint changes nothing.
func checkCacheControl(param string, raw json.RawMessage) *apiError {
	if isNull(raw) {
		return nil
	}
	if e := checkKeys(param, raw, []string{"type", "ttl"}); e != nil {
		return e
	}
	var cc struct {
		Type string `json:"type"`
	}
	if err := json.Unmarshal(raw, &cc); err != nil || cc.Type != "ephemeral" {
		return badRequest(param+".type", "%s.type: must be \"ephemeral\".", param)
	}
	return nil
}

// applyThinking decides what happens to reasoning: with the engine's reasoning parser it is
// always split off the text, and goes out as thinking blocks when thinking is adaptive.
func (a *anthropicRequest) applyThinking(req *llm.Request, p *anthropicParams, m llm.ModelInfo) *apiError {
	mode := "disabled"
	if !isNull(a.Thinking) {
		var t struct {
			Type string `json:"type"`
		}
		if err := json.Unmarshal(a.Thinking, &t); err != nil {
			return badRequest("thinking", "thinking: must be an object {\"type\": ...}.")
		}
		mode = t.Type
		allowed := []string{"type"}
		if mode == "adaptive" {
			allowed = append(allowed, "display")
		}
		switch mode {
		case "disabled", "adaptive":
			if e := checkKeys("thinking", a.Thinking, allowed); e != nil {
				return e
			}
		case "enabled":
			return badRequest("thinking.budget_tokens", "thinking.budget_tokens: a thinking budget cannot be enforced by this server; use {\"type\": \"adaptive\"} (max_tokens bounds thinking and text together).")
		default:
			return badRequest("thinking.type", "thinking.type: must be \"disabled\" or \"adaptive\", got %q.", mode)
		}
	}
	if mode == "adaptive" && m.ReasoningParser == "" {
		return badRequest("thinking", "thinking: this server has no reasoning parser (start it with --reasoning-parser NAME).")
	}
	if m.ReasoningParser != "" {
		req.Parsing = &llm.Parsing{Reasoning: true, Streamed: a.Stream}
	}
	p.thinking = mode == "adaptive"
	p.dropReasoning = !p.thinking
	return nil
}

// applyTools converts tools and tool_choice to OpenAI's shape and applies them as the chat
// route does (tools.go), naming the Anthropic fields in errors.
func (a *anthropicRequest) applyTools(req *llm.Request, p *anthropicParams, m llm.ModelInfo) *apiError {
	var chat chatRequest
	chat.Stream = a.Stream
	if a.Tools != nil {
		if len(a.Tools) == 0 {
			return badRequest("tools", "tools: must not be an empty array; omit it to send no tools.")
		}
		defs := make([]map[string]any, len(a.Tools))
		for i, raw := range a.Tools {
			param := fmt.Sprintf("tools[%d]", i)
			if e := checkKeys(param, raw, anthropicToolFields); e != nil {
				return e
			}
			var t anthropicTool
			if err := json.Unmarshal(raw, &t); err != nil {
				return badRequest(param, "%s: must be a tool {\"name\", \"description\", \"input_schema\"}.", param)
			}
			if t.Type != nil && *t.Type != "custom" {
				return badRequest(param+".type", "%s.type: server tools (%q) are not supported; only client tools (type \"custom\" or none).", param, *t.Type)
			}
			if !toolNameRE.MatchString(t.Name) {
				return badRequest(param+".name", "%s.name: must be 1 to 64 letters, digits, underscores and dashes, got %q.", param, t.Name)
			}
			if !isObject(t.InputSchema) {
				return badRequest(param+".input_schema", "%s.input_schema: field required (a JSON schema object).", param)
			}
			if e := checkCacheControl(param+".cache_control", t.CacheControl); e != nil {
				return e
			}
			fn := map[string]any{"name": t.Name, "parameters": t.InputSchema}
			if t.Description != nil {
				fn["description"] = *t.Description
			}
			defs[i] = map[string]any{"type": "function", "function": fn}
		}
		b, err := json.Marshal(defs)
		if err != nil {
			return errorf(http.StatusInternalServerError, "", "Internal server error")
		}
		chat.Tools = b
	}
	if !isNull(a.ToolChoice) {
		if e := checkKeys("tool_choice", a.ToolChoice, []string{"type", "name", "disable_parallel_tool_use"}); e != nil {
			return e
		}
		var tc anthropicToolChoice
		if err := json.Unmarshal(a.ToolChoice, &tc); err != nil {
			return badRequest("tool_choice", "tool_choice: must be {\"type\": \"auto\"|\"any\"|\"tool\"|\"none\", ...}.")
		}
		if a.Tools == nil && tc.Type != "none" {
			return badRequest("tool_choice", "tool_choice: tools must be set.")
		}
		var choice any
		switch tc.Type {
		case "auto":
			choice = toolChoiceAuto
		case "any":
			choice = toolChoiceRequired
		case "none":
			choice = toolChoiceNone
		case "tool":
			if tc.Name == nil || *tc.Name == "" {
				return badRequest("tool_choice.name", "tool_choice.name: field required with type \"tool\".")
			}
			choice = map[string]any{"type": "function", "function": map[string]string{"name": *tc.Name}}
		default:
			return badRequest("tool_choice.type", "tool_choice.type: must be \"auto\", \"any\", \"tool\" or \"none\", got %q.", tc.Type)
		}
		if tc.Name != nil && tc.Type != "tool" {
			return badRequest("tool_choice.name", "tool_choice.name: only with type \"tool\".")
		}
		if tc.DisableParallelToolUse != nil {
			if tc.Type == "none" {
				return badRequest("tool_choice.disable_parallel_tool_use", "tool_choice.disable_parallel_tool_use: not with type \"none\".")
			}
			chat.ParallelToolCalls = llm.Ptr(!*tc.DisableParallelToolUse)
		}
		if a.Tools != nil {
			chat.ToolChoice, _ = json.Marshal(choice) // strings and maps of strings always encode
		}
	}
	e := chat.applyTools(req, &p.callParams, m)
	if e != nil {
		e.Param = anthropicToolParam(e.Param)
		e.Message = strings.NewReplacer(".function.parameters", ".input_schema", ".function.name", ".name",
			`"required"`, `"any"`, "function ", "tool ").Replace(e.Message)
	}
	return e
}

// anthropicToolParam names a field of tools.go's errors as the Anthropic request spells it.
func anthropicToolParam(param string) string {
	return strings.NewReplacer(".function.parameters", ".input_schema", ".function.name", ".name", ".function", "").Replace(param)
}

// conversation converts system and messages into chat messages.
func (a *anthropicRequest) conversation() ([]llm.Message, *apiError) {
	var out []llm.Message
	if !isNull(a.System) {
		sys, e := textContent("system", a.System)
		if e != nil {
			return nil, e
		}
		if sys != "" {
			out = append(out, llm.Message{Role: "system", Content: sys})
		}
	}
	if len(a.Messages) == 0 {
		return nil, badRequest("messages", "messages: must be a non-empty array.")
	}
	for i, msg := range a.Messages {
		param := fmt.Sprintf("messages[%d]", i)
		if msg.Role != "user" && msg.Role != "assistant" {
			return nil, badRequest(param+".role", "%s.role: must be \"user\" or \"assistant\", got %q.", param, msg.Role)
		}
		converted, e := convertMessage(param, msg)
		if e != nil {
			return nil, e
		}
		out = append(out, converted...)
	}
	if last := out[len(out)-1]; last.Role == "assistant" && (len(last.ToolCalls) > 0 || last.Content == "") {
		return nil, badRequest(fmt.Sprintf("messages[%d]", len(a.Messages)-1),
			"messages[%d]: a final assistant message (prefill) must be text only, and not empty.", len(a.Messages)-1)
	}
	return out, nil
}

// convertMessage converts one message: text blocks join into its content, tool_use blocks
// become the assistant's calls, tool_result blocks "tool" messages (before the user's text).
func convertMessage(param string, msg anthropicMessage) ([]llm.Message, *apiError) {
	raw := bytes.TrimSpace(msg.Content)
	if len(raw) > 0 && raw[0] == '"' {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, badRequest(param+".content", "%s.content: not a valid string.", param)
		}
		return []llm.Message{{Role: msg.Role, Content: s}}, nil
	}
	var blocks []json.RawMessage
	if err := json.Unmarshal(raw, &blocks); err != nil || len(raw) == 0 || raw[0] != '[' {
		return nil, badRequest(param+".content", "%s.content: must be a string or an array of content blocks.", param)
	}
	var texts []string
	var calls []llm.ToolCall
	var results []llm.Message
	for j, rb := range blocks {
		bp := fmt.Sprintf("%s.content[%d]", param, j)
		var b anthropicBlock
		if err := json.Unmarshal(rb, &b); err != nil {
			return nil, badRequest(bp, "%s: must be a content block object.", bp)
		}
		if e := checkCacheControl(bp+".cache_control", b.CacheControl); e != nil {
			return nil, e
		}
		switch b.Type {
		case "text":
			if e := checkKeys(bp, rb, []string{"type", "text", "cache_control"}); e != nil {
				return nil, e
			}
			if b.Text == nil {
				return nil, badRequest(bp+".text", "%s.text: field required.", bp)
			}
			texts = append(texts, *b.Text)
		case "tool_use":
			if msg.Role != "assistant" {
				return nil, badRequest(bp+".type", "%s: tool_use blocks belong in assistant messages.", bp)
			}
			if e := checkKeys(bp, rb, []string{"type", "id", "name", "input", "cache_control"}); e != nil {
				return nil, e
			}
			switch {
			case b.ID == "":
				return nil, badRequest(bp+".id", "%s.id: field required.", bp)
			case b.Name == "":
				return nil, badRequest(bp+".name", "%s.name: field required.", bp)
			case !isObject(b.Input):
				return nil, badRequest(bp+".input", "%s.input: must be an object.", bp)
			}
			calls = append(calls, llm.ToolCall{ID: b.ID, Type: "function",
				Function: llm.FunctionCall{Name: b.Name, Arguments: string(compactJSON(b.Input))}})
		case "tool_result":
			if msg.Role != "user" {
				return nil, badRequest(bp+".type", "%s: tool_result blocks belong in user messages.", bp)
			}
			if e := checkKeys(bp, rb, []string{"type", "tool_use_id", "content", "is_error", "cache_control"}); e != nil {
				return nil, e
			}
			if b.ToolUseID == "" {
				return nil, badRequest(bp+".tool_use_id", "%s.tool_use_id: field required.", bp)
			}
			content := ""
			if !isNull(b.Content) {
				var e *apiError
				if content, e = textContent(bp+".content", b.Content); e != nil {
					return nil, e
				}
			}
			if b.IsError != nil && *b.IsError {
				// Chat templates have no error flag for tool output: say it in the text.
				content = "Error: " + content
			}
			results = append(results, llm.Message{Role: "tool", Content: content, ToolCallID: b.ToolUseID})
		case "thinking", "redacted_thinking":
			// Earlier turns' thinking is not sent back to the model, as Anthropic's API does.
			if msg.Role != "assistant" {
				return nil, badRequest(bp+".type", "%s: %s blocks belong in assistant messages.", bp, b.Type)
			}
		case "":
			return nil, badRequest(bp+".type", "%s.type: field required.", bp)
		default:
			return nil, badRequest(bp+".type", "%s.type: %q blocks are not supported (only text, tool_use and tool_result).", bp, b.Type)
		}
	}
	text := strings.Join(texts, "\n")
	if msg.Role == "assistant" {
		return []llm.Message{{Role: "assistant", Content: text, ToolCalls: calls}}, nil
	}
	if len(texts) > 0 || len(results) == 0 {
		results = append(results, llm.Message{Role: "user", Content: text})
	}
	return results, nil
}

// textContent reads a string or an array of text blocks (system, a tool_result's content),
// joined with "\n".
func textContent(param string, raw json.RawMessage) (string, *apiError) {
	raw = bytes.TrimSpace(raw)
	if len(raw) > 0 && raw[0] == '"' {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return "", badRequest(param, "%s: not a valid string.", param)
		}
		return s, nil
	}
	var blocks []json.RawMessage
	if err := json.Unmarshal(raw, &blocks); err != nil || len(raw) == 0 || raw[0] != '[' {
		return "", badRequest(param, "%s: must be a string or an array of text blocks.", param)
	}
	texts := make([]string, len(blocks))
	for j, rb := range blocks {
		bp := fmt.Sprintf("%s[%d]", param, j)
		var b anthropicBlock
		if err := json.Unmarshal(rb, &b); err != nil {
			return "", badRequest(bp, "%s: must be a text block.", bp)
		}
		if b.Type != "text" {
			return "", badRequest(bp+".type", "%s.type: only text blocks are supported here, got %q.", bp, b.Type)
		}
		if e := checkKeys(bp, rb, []string{"type", "text", "cache_control"}); e != nil {
			return "", e
		}
		if e := checkCacheControl(bp+".cache_control", b.CacheControl); e != nil {
			return "", e
		}
		if b.Text == nil {
			return "", badRequest(bp+".text", "%s.text: field required.", bp)
		}
		texts[j] = *b.Text
	}
	return strings.Join(texts, "\n"), nil
}

// anthropicErrorBody is Anthropic's error shape.
type anthropicErrorBody struct {
	Type  string             `json:"type"` // "error"
	Error anthropicErrorInfo `json:"error"`
}

type anthropicErrorInfo struct {
	Type    string `json:"type"`
	Message string `json:"message"`
}

// anthropicErrorType names the error type of a status as Anthropic does.
func anthropicErrorType(status int) string {
	switch status {
	case http.StatusBadRequest, http.StatusMethodNotAllowed, http.StatusUnprocessableEntity:
		return "invalid_request_error"
	case http.StatusUnauthorized:
		return "authentication_error"
	case http.StatusForbidden:
		return "permission_error"
	case http.StatusNotFound:
		return "not_found_error"
	case http.StatusRequestEntityTooLarge:
		return "request_too_large"
	case http.StatusTooManyRequests:
		return "rate_limit_error"
	case http.StatusServiceUnavailable, 529:
		return "overloaded_error"
	}
	if status < 500 {
		return "invalid_request_error"
	}
	return "api_error"
}

// anthropicBody is e in Anthropic's shape; the field it is about leads the message unless the
// message names it already.
func (e *apiError) anthropicBody() anthropicErrorBody {
	msg := e.Message
	if e.Param != "" && !strings.Contains(msg, e.Param) {
		msg = e.Param + ": " + msg
	}
	return anthropicErrorBody{Type: "error", Error: anthropicErrorInfo{Type: anthropicErrorType(e.Status), Message: msg}}
}

// writeAnthropicError answers with e in Anthropic's shape.
func writeAnthropicError(w http.ResponseWriter, e *apiError) {
	writeJSON(w, e.Status, e.anthropicBody())
}

// isAnthropicPath reports whether path is one of Anthropic's routes, whose errors have its shape.
func isAnthropicPath(path string) bool {
	return path == "/v1/messages" || strings.HasPrefix(path, "/v1/messages/")
}

// anthropicNotFound answers unknown paths under /v1/messages/ with a 404 in Anthropic's shape.
func anthropicNotFound(w http.ResponseWriter, r *http.Request) {
	writeAnthropicError(w, errorf(http.StatusNotFound, "", "Not found: %s %s", r.Method, r.URL.Path))
}

// rejectAnthropic logs err and answers with e in Anthropic's shape; a nil e means the client is gone.
func (s *Server) rejectAnthropic(w http.ResponseWriter, c *call, err error, e *apiError) {
	s.logFailure(c.log, err, e)
	if e != nil {
		writeAnthropicError(w, e)
	}
}

// handleMessages serves POST /v1/messages.
func (s *Server) handleMessages(w http.ResponseWriter, r *http.Request) {
	start := s.now()
	id := requestID(r, "msg_")
	c := &call{id: id, created: start.Unix(), log: s.log.With("request_id", id), start: start,
		kind: "messages", newID: s.newID}
	var body anthropicRequest
	if e := decodeAnthropic(w, r, s.maxBodyBytes, anthropicFields, &body); e != nil {
		s.rejectAnthropic(w, c, e, e)
		return
	}
	info := s.backend.Model()
	req, params, e := body.toEngine(info, false)
	if e != nil {
		s.rejectAnthropic(w, c, e, e)
		return
	}
	req.ID = id
	c.model = responseModel(req, info)
	c.params = params.callParams
	if params.forced != nil && params.stream {
		c.forced = make([]*forcedCalls, 1)
	}
	s.runMessages(w, r, req, c, &params)
}

// runMessages admits req, runs it and answers as Anthropic does, streamed or not (generate's
// steps, with Anthropic's output and error shapes).
func (s *Server) runMessages(w http.ResponseWriter, r *http.Request, req llm.Request, c *call, p *anthropicParams) {
	c.params.n = 1
	reject := func(err error, e *apiError) { s.rejectAnthropic(w, c, err, e) }
	s.run(w, r, req, c, reject, func() bool {
		if p.stream {
			return s.streamMessages(w, c, p)
		}
		return s.completeMessages(w, c, p)
	})
}

// anthropicMessageBody is the body of a non-streamed answer (and, empty, of message_start).
type anthropicMessageBody struct {
	ID           string           `json:"id"`
	Type         string           `json:"type"` // "message"
	Role         string           `json:"role"` // "assistant"
	Model        string           `json:"model"`
	Content      []map[string]any `json:"content"`
	StopReason   *string          `json:"stop_reason"`
	StopSequence *string          `json:"stop_sequence"`
	Usage        anthropicUsage   `json:"usage"`
}

// anthropicUsage counts a message's tokens.
type anthropicUsage struct {
	InputTokens  int `json:"input_tokens"`
	OutputTokens int `json:"output_tokens"`
}

// anthropicStopReason maps the engine's finish reason to Anthropic's stop_reason: nil for a
// request the server aborted (there is no Anthropic reason for it).
func anthropicStopReason(finish, matched string, toolUsed bool) *string {
	var r string
	switch {
	case finish == "length":
		r = "max_tokens"
	case finish == "tool_calls" || (toolUsed && finish == "stop"):
		r = "tool_use"
	case matched != "":
		r = "stop_sequence"
	case finish == "stop":
		r = "end_turn"
	default:
		return nil
	}
	return &r
}

// anthropicToolID is the id of a tool_use block for a call id of the engine or the server.
func anthropicToolID(id string) string {
	if strings.HasPrefix(id, anthropicToolIDPrefix) {
		return id
	}
	return anthropicToolIDPrefix + strings.TrimPrefix(id, toolCallIDPrefix)
}

// toolInput is a call's arguments as a tool_use input, which must be a JSON object.
func toolInput(args string) (json.RawMessage, error) {
	if strings.TrimSpace(args) == "" {
		return json.RawMessage(`{}`), nil
	}
	raw := json.RawMessage(args)
	if !isObject(raw) {
		return nil, fmt.Errorf("%w: tool call arguments are not a JSON object: %.200q", errBadDelta, args)
	}
	return compactJSON(raw), nil
}

// completeMessages collects the whole output and answers with one message.
func (s *Server) completeMessages(w http.ResponseWriter, c *call, p *anthropicParams) bool {
	var text, reasoning strings.Builder
	var calls []llm.ToolCall
	finish := ""
	for {
		d, err := s.next(c)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			s.rejectAnthropic(w, c, fmt.Errorf("server: messages: %w", err), toAPIError(err))
			return false
		}
		text.WriteString(d.Text)
		reasoning.WriteString(d.Reasoning)
		if len(d.ToolCalls) > 0 {
			calls = mergeToolCalls(calls, d.ToolCalls)
		}
		if d.FinishReason != "" {
			finish = d.FinishReason
		}
	}
	out := text.String()
	if f := p.forced; f != nil {
		if forced, ok := parseForced(f, out, func() string { return c.newID(toolCallIDPrefix) }); ok {
			calls, out = forced, ""
		}
	}
	matched := ""
	if len(p.stops) > 0 {
		out, matched = cutStop(out, finish, p.stops)
	}
	content := []map[string]any{}
	if p.thinking && reasoning.Len() > 0 {
		content = append(content, map[string]any{"type": "thinking", "thinking": reasoning.String(), "signature": ""})
	}
	if out != "" || len(calls) == 0 {
		content = append(content, map[string]any{"type": "text", "text": out})
	}
	for _, tc := range calls {
		input, err := toolInput(tc.Function.Arguments)
		if err != nil {
			s.rejectAnthropic(w, c, fmt.Errorf("server: messages: %w", err), errorf(http.StatusInternalServerError, "", "The model's tool call is not valid: its input is not a JSON object."))
			return false
		}
		content = append(content, map[string]any{"type": "tool_use", "id": anthropicToolID(tc.ID), "name": tc.Function.Name, "input": input})
	}
	u := c.usage()
	body := anthropicMessageBody{ID: c.id, Type: "message", Role: assistantRole, Model: c.model, Content: content,
		StopReason: anthropicStopReason(finish, matched, len(calls) > 0),
		Usage:      anthropicUsage{InputTokens: u.PromptTokens, OutputTokens: u.CompletionTokens}}
	if matched != "" {
		body.StopSequence = &matched
	}
	writeJSON(w, http.StatusOK, &body)
	s.logDone(c, u)
	return true
}

// cutStop removes the stop sequence that ended text (the engine kept it, include_stop_str_in_output)
// and returns it; the longest one wins when several end it.
func cutStop(text, finish string, stops []string) (string, string) {
	if finish != "stop" {
		return text, ""
	}
	best := ""
	for _, s := range stops {
		if strings.HasSuffix(text, s) && len(s) > len(best) {
			best = s
		}
	}
	return text[:len(text)-len(best)], best
}

// heldStop is how many bytes at the end of text could start a stop sequence: they wait until
// the next delta says whether the sequence follows.
func heldStop(text string, stops []string) int {
	held := 0
	for _, s := range stops {
		for k := min(len(s), len(text)); k > held; k-- {
			if strings.HasSuffix(text, s[:k]) {
				held = k
				break
			}
		}
	}
	// Never split a character: text ends on a boundary, and a held part equal to the start of a
	// stop string starts on one.
	for held > 0 && !utf8.RuneStart(text[len(text)-held]) {
		held--
	}
	return held
}

// handleCountTokens serves POST /v1/messages/count_tokens.
func (s *Server) handleCountTokens(w http.ResponseWriter, r *http.Request) {
	start := s.now()
	c := &call{id: requestID(r, "count-"), start: start, kind: "count_tokens"}
	c.log = s.log.With("request_id", c.id)
	var body anthropicRequest
	if e := decodeAnthropic(w, r, s.maxBodyBytes, anthropicCountFields, &body); e != nil {
		s.rejectAnthropic(w, c, e, e)
		return
	}
	tok, ok := s.backend.(llm.Tokenizer)
	if !ok {
		e := errorf(http.StatusNotImplemented, "", "count_tokens needs a backend that tokenizes; this server's backend (%s) does not.", backendName(s.backend.Model()))
		s.rejectAnthropic(w, c, e, e)
		return
	}
	req, _, e := body.toEngine(s.backend.Model(), true)
	if e != nil {
		s.rejectAnthropic(w, c, e, e)
		return
	}
	res, err := tok.Tokenize(r.Context(), llm.TokenizeRequest{Messages: req.Messages, Tools: req.Tools, AddGenerationPrompt: true})
	if err != nil {
		s.rejectAnthropic(w, c, fmt.Errorf("server: count_tokens: %w", err), toAPIError(err))
		return
	}
	writeJSON(w, http.StatusOK, map[string]int{"input_tokens": len(res.TokenIDs)})
}
