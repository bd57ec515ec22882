package server

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"strings"

	"github.com/govllm/govllm/llm"
)

// The Responses API (POST /v1/responses), stateless: nothing is stored, so store,
// previous_response_id, background and conversation are refused, as is every field the server
// does not act on. A request becomes a chat request: instructions a system message, input the
// conversation; the output is rendered as a response object (responses_out.go) or OpenAI's
// event sequence (responses_stream.go).

// responsesRequest is the body of POST /v1/responses. Unlike chat, a field the server does not
// know is refused (responsesFields), so that nothing a client asks for is silently dropped.
type responsesRequest struct {
	Model             string            `json:"model"`
	Input             json.RawMessage   `json:"input"`
	Instructions      *string           `json:"instructions"`
	MaxOutputTokens   *int              `json:"max_output_tokens"`
	Temperature       *float64          `json:"temperature"`
	TopP              *float64          `json:"top_p"`
	Text              *responsesText    `json:"text"`
	Tools             json.RawMessage   `json:"tools"`
	ToolChoice        json.RawMessage   `json:"tool_choice"`
	ParallelToolCalls *bool             `json:"parallel_tool_calls"`
	Stream            bool              `json:"stream"`
	StreamOptions     *responsesStream  `json:"stream_options"`
	Metadata          map[string]string `json:"metadata"`
	// User, SafetyIdentifier and PromptCacheKey are accepted and ignored (prefix caching is
	// the engine's own); their types are still checked.
	User             string `json:"user"`
	SafetyIdentifier string `json:"safety_identifier"`
	PromptCacheKey   string `json:"prompt_cache_key"`
	// Accepted only with the value that means "off" (refused otherwise, see unsupported).
	Store              *bool            `json:"store"`
	Background         *bool            `json:"background"`
	PreviousResponseID *string          `json:"previous_response_id"`
	Conversation       json.RawMessage  `json:"conversation"`
	Prompt             json.RawMessage  `json:"prompt"`
	Include            []string         `json:"include"`
	TopLogprobs        *int             `json:"top_logprobs"`
	Truncation         *string          `json:"truncation"`
	ServiceTier        *string          `json:"service_tier"`
	MaxToolCalls       *int             `json:"max_tool_calls"`
	Reasoning          *responsesReason `json:"reasoning"`
	N                  *int             `json:"n"`
}

// responsesText is the request's "text": the output format.
type responsesText struct {
	Format    json.RawMessage `json:"format"`
	Verbosity *string         `json:"verbosity"`
}

// responsesTextFormat is text.format: {"type":"text"}, {"type":"json_object"} or
// {"type":"json_schema","name","schema","strict","description"}.
type responsesTextFormat struct {
	Type        string          `json:"type"`
	Name        string          `json:"name"`
	Schema      json.RawMessage `json:"schema"`
	Strict      *bool           `json:"strict"`
	Description *string         `json:"description"`
}

// responsesStream is the request's stream_options.
type responsesStream struct {
	IncludeObfuscation *bool `json:"include_obfuscation"`
}

// responsesReason is the request's "reasoning"; only nulls are accepted, as chat refuses
// reasoning_effort (the engine takes no chat-template arguments).
type responsesReason struct {
	Effort          json.RawMessage `json:"effort"`
	Summary         json.RawMessage `json:"summary"`
	GenerateSummary json.RawMessage `json:"generate_summary"`
}

// responsesFields are the JSON names of responsesRequest's fields: any other is refused.
var responsesFields = func() map[string]bool {
	t := reflect.TypeFor[responsesRequest]()
	m := make(map[string]bool, t.NumField())
	for i := range t.NumField() {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
		m[name] = true
	}
	return m
}()

// inputItem is an element of an array "input": a message (type "message", or no type with a
// role), a function_call the assistant made, a function_call_output answering one, or a
// reasoning item (dropped: chat templates leave earlier reasoning out).
type inputItem struct {
	Type      string          `json:"type"`
	Role      string          `json:"role"`
	Content   json.RawMessage `json:"content"`
	CallID    *string         `json:"call_id"`
	Name      string          `json:"name"`
	Arguments *string         `json:"arguments"`
	Output    json.RawMessage `json:"output"`
}

// inputPart is an element of an array content (or of a function_call_output's output).
type inputPart struct {
	Type string  `json:"type"`
	Text *string `json:"text"`
}

// responsesTool is a Responses function tool: flat, {"type":"function","name",...}.
type responsesTool struct {
	Type        string          `json:"type"`
	Name        string          `json:"name"`
	Description *string         `json:"description"`
	Parameters  json.RawMessage `json:"parameters"`
	Strict      *bool           `json:"strict"`
}

// decodeResponsesRequest decodes data into a request, refusing unknown fields and naming the
// field of a wrong type.
func decodeResponsesRequest(data json.RawMessage) (*responsesRequest, *apiError) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(data, &fields); err != nil {
		return nil, badRequest("", "The request body must be a JSON object.")
	}
	for k := range fields {
		if !responsesFields[k] {
			return nil, badRequest(k, "`%s` is not supported by this server's /v1/responses.", k)
		}
	}
	var body responsesRequest
	if err := json.Unmarshal(data, &body); err != nil {
		if te, ok := errors.AsType[*json.UnmarshalTypeError](err); ok && te.Field != "" {
			return nil, badRequest(te.Field, "Invalid type for `%s`: expected %s, got JSON %s.",
				te.Field, describeType(te.Type), te.Value)
		}
		return nil, badRequest("", "Malformed JSON body: %v.", err)
	}
	return &body, nil
}

// unsupported refuses the fields that are accepted only with their "off" value.
func (b *responsesRequest) unsupported() *apiError {
	switch {
	case b.Store != nil && *b.Store:
		return badRequest("store", "store=true is not supported: this server keeps no responses; set store to false.")
	case b.Background != nil && *b.Background:
		return badRequest("background", "Background mode is not supported: this server keeps no responses.")
	case b.PreviousResponseID != nil:
		return badRequest("previous_response_id", "previous_response_id is not supported: this server keeps no responses; send the whole conversation in `input`.")
	case !isNull(b.Conversation):
		return badRequest("conversation", "conversation is not supported: this server keeps no conversations; send the whole conversation in `input`.")
	case !isNull(b.Prompt):
		return badRequest("prompt", "Prompt templates (`prompt`) are not supported; send `instructions` and `input`.")
	case len(b.Include) > 0:
		return badRequest("include", "include %q is not supported: this server produces none of the optional outputs.", b.Include[0])
	case b.TopLogprobs != nil && *b.TopLogprobs != 0:
		return badRequest("top_logprobs", "top_logprobs is not supported on /v1/responses.")
	case b.Truncation != nil && *b.Truncation != "disabled":
		return badRequest("truncation", "truncation %q is not supported; only \"disabled\" (an input too long for the model is refused).", *b.Truncation)
	case b.ServiceTier != nil && *b.ServiceTier != "auto" && *b.ServiceTier != "default":
		return badRequest("service_tier", "service_tier %q is not supported; only \"auto\" and \"default\".", *b.ServiceTier)
	case b.MaxToolCalls != nil:
		return badRequest("max_tool_calls", "max_tool_calls is not supported.")
	case b.N != nil && *b.N != 1:
		return badRequest("n", "n is not supported on /v1/responses: a response has one output.")
	case b.StreamOptions != nil && !b.Stream:
		return badRequest("stream_options", "stream_options can only be set when stream is true.")
	case b.StreamOptions != nil && b.StreamOptions.IncludeObfuscation != nil && *b.StreamOptions.IncludeObfuscation:
		return badRequest("stream_options.include_obfuscation", "stream_options.include_obfuscation is not supported; set it to false.")
	case b.Text != nil && b.Text.Verbosity != nil:
		return badRequest("text.verbosity", "text.verbosity is not supported.")
	}
	if r := b.Reasoning; r != nil {
		for _, f := range []struct {
			name string
			raw  json.RawMessage
		}{{"effort", r.Effort}, {"summary", r.Summary}, {"generate_summary", r.GenerateSummary}} {
			if !isNull(f.raw) {
				return badRequest("reasoning."+f.name, "reasoning.%s is not supported (the engine takes no chat-template arguments).", f.name)
			}
		}
	}
	return nil
}

// toEngine validates b against the served model and converts it into an engine request.
func (b *responsesRequest) toEngine(m llm.ModelInfo) (llm.Request, callParams, *apiError) {
	var req llm.Request
	p := callParams{n: 1, stream: b.Stream}
	if e := checkModel(b.Model, m); e != nil {
		return req, p, e
	}
	req.Adapter = adapterFor(b.Model, m)
	if e := b.unsupported(); e != nil {
		return req, p, e
	}
	msgs, e := inputMessages(b.Input)
	if e != nil {
		return req, p, e
	}
	if b.Instructions != nil && *b.Instructions != "" {
		msgs = append([]llm.Message{{Role: "system", Content: *b.Instructions}}, msgs...)
	}
	req.Messages = msgs

	sp := &req.Sampling
	if b.MaxOutputTokens != nil {
		sp.MaxTokens = *b.MaxOutputTokens
		if e := checkMaxTokens("max_output_tokens", sp.MaxTokens, m.MaxModelLen); e != nil {
			return req, p, e
		}
	}
	chat := chatRequest{
		ParallelToolCalls: b.ParallelToolCalls,
		samplingRequest:   samplingRequest{Temperature: b.Temperature, TopP: b.TopP, Stream: b.Stream},
	}
	if e := chat.samplingRequest.apply(sp, &p, m); e != nil {
		return req, p, e
	}
	if b.Text != nil {
		if sp.StructuredOutputs, e = textConstraint(b.Text.Format); e != nil {
			return req, p, e
		}
		if so := sp.StructuredOutputs; so != nil && !m.StructuredOutputs {
			return req, p, badRequest(so.Param, "%s is not supported by this server: its backend (%s) does not apply structured outputs.", so.Param, backendName(m))
		}
	}
	if m.ReasoningParser != "" {
		req.Parsing = &llm.Parsing{Reasoning: true, Streamed: b.Stream}
	}
	if chat.Tools, e = chatTools(b.Tools); e != nil {
		return req, p, e
	}
	if chat.ToolChoice, e = chatToolChoice(b.ToolChoice); e != nil {
		return req, p, e
	}
	if e := chat.applyTools(&req, &p, m); e != nil {
		return req, p, responsesToolError(e)
	}
	return req, p, nil
}

// inputMessages converts "input": a string (one user message) or an array of items.
func inputMessages(raw json.RawMessage) ([]llm.Message, *apiError) {
	raw = bytes.TrimSpace(raw)
	switch {
	case isNull(raw):
		return nil, badRequest("input", "`input` is required: a string or an array of input items.")
	case raw[0] == '"':
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, badRequest("input", "input is not a valid string: %v.", err)
		}
		if s == "" {
			return nil, badRequest("input", "`input` must not be empty.")
		}
		return []llm.Message{{Role: "user", Content: s}}, nil
	case raw[0] != '[':
		return nil, badRequest("input", "`input` must be a string or an array of input items.")
	}
	var items []json.RawMessage
	if err := json.Unmarshal(raw, &items); err != nil {
		return nil, badRequest("input", "`input` must be a string or an array of input items.")
	}
	if len(items) == 0 {
		return nil, badRequest("input", "`input` must not be an empty array.")
	}
	var msgs []llm.Message
	callNames := make(map[string]string) // call_id → function name, for tool messages
	for i, rawItem := range items {
		param := fmt.Sprintf("input[%d]", i)
		var it inputItem
		if err := json.Unmarshal(rawItem, &it); err != nil || !isObject(rawItem) {
			return nil, badRequest(param, "%s must be an input item object.", param)
		}
		typ := it.Type
		if typ == "" && it.Role != "" {
			typ = "message"
		}
		switch typ {
		case "message":
			msg, e := inputMessage(param, it)
			if e != nil {
				return nil, e
			}
			msgs = append(msgs, msg)
		case "function_call":
			call, e := inputFunctionCall(param, it)
			if e != nil {
				return nil, e
			}
			callNames[call.ID] = call.Function.Name
			// Calls join the assistant turn they belong to (parallel calls, or text then calls).
			if n := len(msgs); n > 0 && msgs[n-1].Role == assistantRole {
				msgs[n-1].ToolCalls = append(msgs[n-1].ToolCalls, call)
			} else {
				msgs = append(msgs, llm.Message{Role: assistantRole, ToolCalls: []llm.ToolCall{call}})
			}
		case "function_call_output":
			if it.CallID == nil || *it.CallID == "" {
				return nil, badRequest(param+".call_id", "%s.call_id is required.", param)
			}
			out, e := itemText(param+".output", it.Output, "input_text")
			if e != nil {
				return nil, e
			}
			msgs = append(msgs, llm.Message{Role: "tool", Content: out, ToolCallID: *it.CallID, Name: callNames[*it.CallID]})
		case "reasoning":
			// Dropped: the model's earlier reasoning is not part of the prompt, as chat templates do.
		case "":
			return nil, badRequest(param+".type", "%s.type is required.", param)
		default:
			return nil, badRequest(param+".type", "%s.type %q is not supported; only message, function_call, function_call_output and reasoning items.", param, typ)
		}
	}
	if len(msgs) == 0 {
		return nil, badRequest("input", "`input` has no message: reasoning items alone are no conversation.")
	}
	return msgs, nil
}

// inputMessage converts a message item.
func inputMessage(param string, it inputItem) (llm.Message, *apiError) {
	if it.Role == "" {
		return llm.Message{}, badRequest(param+".role", "%s.role is required.", param)
	}
	var role string
	switch it.Role {
	case "user", "system", "assistant":
		role = it.Role
	case "developer":
		role = "system"
	default:
		return llm.Message{}, badRequest(param+".role", "%s.role must be one of user, system, developer and assistant, got %q.", param, it.Role)
	}
	part := "input_text"
	if role == assistantRole {
		part = "output_text"
	}
	text, e := itemText(param+".content", it.Content, part)
	if e != nil {
		return llm.Message{}, e
	}
	return llm.Message{Role: role, Content: text}, nil
}

// itemText returns the text of a content: a string, or an array of text parts (of type part,
// or input_text) joined with "\n" as chat content is.
func itemText(param string, raw json.RawMessage, part string) (string, *apiError) {
	raw = bytes.TrimSpace(raw)
	switch {
	case isNull(raw):
		return "", badRequest(param, "%s is required.", param)
	case raw[0] == '"':
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return "", badRequest(param, "%s is not a valid string: %v.", param, err)
		}
		return s, nil
	case raw[0] != '[':
		return "", badRequest(param, "%s must be a string or an array of text parts.", param)
	}
	var parts []inputPart
	if err := json.Unmarshal(raw, &parts); err != nil {
		return "", badRequest(param, "%s must be a string or an array of text parts.", param)
	}
	var b strings.Builder
	for j, p := range parts {
		pj := fmt.Sprintf("%s[%d]", param, j)
		if p.Type != part && p.Type != "input_text" {
			return "", badRequest(pj+".type", "%s.type %q is not supported; only text parts (%s).", pj, p.Type, part)
		}
		if p.Text == nil {
			return "", badRequest(pj+".text", "%s.text is required.", pj)
		}
		if j > 0 {
			b.WriteByte('\n')
		}
		b.WriteString(*p.Text)
	}
	return b.String(), nil
}

// inputFunctionCall converts a function_call item into the tool call of an assistant message.
func inputFunctionCall(param string, it inputItem) (llm.ToolCall, *apiError) {
	switch {
	case it.CallID == nil || *it.CallID == "":
		return llm.ToolCall{}, badRequest(param+".call_id", "%s.call_id is required.", param)
	case it.Name == "":
		return llm.ToolCall{}, badRequest(param+".name", "%s.name is required.", param)
	case it.Arguments == nil:
		return llm.ToolCall{}, badRequest(param+".arguments", "%s.arguments is required (a JSON text).", param)
	case !json.Valid([]byte(*it.Arguments)):
		return llm.ToolCall{}, badRequest(param+".arguments", "%s.arguments must be a JSON text.", param)
	}
	return llm.ToolCall{ID: *it.CallID, Type: "function",
		Function: llm.FunctionCall{Name: it.Name, Arguments: *it.Arguments}}, nil
}

// textConstraint converts text.format; nil means no constraint ({"type":"text"}).
func textConstraint(raw json.RawMessage) (*llm.StructuredOutputs, *apiError) {
	const param = "text.format"
	if isNull(raw) {
		return nil, nil
	}
	var f responsesTextFormat
	if err := json.Unmarshal(raw, &f); err != nil || !isObject(raw) {
		return nil, badRequest(param, "text.format must be an object with a type.")
	}
	switch f.Type {
	case "text":
		return nil, nil
	case "json_object":
		return &llm.StructuredOutputs{JSONObject: true, Param: param}, nil
	case "json_schema":
		switch {
		case f.Name == "":
			return nil, badRequest(param+".name", "text.format.name is required when text.format.type is \"json_schema\".")
		case !toolNameRE.MatchString(f.Name):
			return nil, badRequest(param+".name", "text.format.name must be 1 to 64 letters, digits, underscores and dashes, got %q.", f.Name)
		case isNull(f.Schema):
			return nil, badRequest(param+".schema", "text.format.schema is required when text.format.type is \"json_schema\".")
		case !isObject(f.Schema):
			return nil, badRequest(param+".schema", "text.format.schema must be a JSON object (a JSON schema).")
		}
		return &llm.StructuredOutputs{JSON: compactJSON(f.Schema), Param: param}, nil
	case "":
		return nil, badRequest(param+".type", "text.format.type is required: one of \"text\", \"json_object\" and \"json_schema\".")
	}
	return nil, badRequest(param+".type", "text.format.type must be one of \"text\", \"json_object\" and \"json_schema\", got %q.", f.Type)
}

// chatTools converts Responses function tools into chat's "tools" (parseTools checks them).
func chatTools(raw json.RawMessage) (json.RawMessage, *apiError) {
	if isNull(raw) {
		return nil, nil
	}
	var items []json.RawMessage
	if err := json.Unmarshal(raw, &items); err != nil {
		return nil, badRequest("tools", "tools must be an array of tools.")
	}
	// The chat shape, without nulls: the chat template renders these tools.
	type chatFunction struct {
		Name        string          `json:"name"`
		Description *string         `json:"description,omitempty"`
		Parameters  json.RawMessage `json:"parameters,omitempty"`
		Strict      *bool           `json:"strict,omitempty"`
	}
	type chatTool struct {
		Type     string       `json:"type"`
		Function chatFunction `json:"function"`
	}
	out := make([]chatTool, len(items))
	for i, it := range items {
		param := fmt.Sprintf("tools[%d]", i)
		var t responsesTool
		if err := json.Unmarshal(it, &t); err != nil || !isObject(it) {
			return nil, badRequest(param, "%s must be an object {\"type\":\"function\",\"name\",\"parameters\",...}.", param)
		}
		if t.Type != "function" {
			return nil, badRequest(param+".type", "%s.type must be \"function\", got %q: this server runs no hosted tools (web_search, file_search, computer, mcp, code_interpreter, ...).", param, t.Type)
		}
		if isNull(t.Parameters) {
			t.Parameters = nil
		}
		out[i] = chatTool{Type: "function", Function: chatFunction{
			Name: t.Name, Description: t.Description, Parameters: t.Parameters, Strict: t.Strict}}
	}
	data, err := json.Marshal(out)
	if err != nil {
		return nil, badRequest("tools", "tools cannot be encoded: %v.", err)
	}
	return data, nil
}

// chatToolChoice converts a Responses tool_choice into chat's: the strings are the same, and
// {"type":"function","name"} becomes {"type":"function","function":{"name"}}.
func chatToolChoice(raw json.RawMessage) (json.RawMessage, *apiError) {
	const param = "tool_choice"
	raw = bytes.TrimSpace(raw)
	if isNull(raw) || raw[0] == '"' {
		return raw, nil
	}
	var c struct {
		Type string `json:"type"`
		Name string `json:"name"`
	}
	if err := json.Unmarshal(raw, &c); err != nil {
		return nil, badRequest(param, "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\":\"function\",\"name\":...}.")
	}
	switch {
	case c.Type != "function":
		return nil, badRequest(param+".type", "tool_choice type %q is not supported; only \"function\" (or the strings \"none\", \"auto\" and \"required\").", c.Type)
	case c.Name == "":
		return nil, badRequest(param+".name", "tool_choice.name is required.")
	}
	data, _ := json.Marshal(map[string]any{"type": "function", "function": map[string]string{"name": c.Name}})
	return data, nil
}

// responsesToolError names a tool error from chat's checks the way a Responses client spells
// the field: tools[i].name rather than tools[i].function.name.
func responsesToolError(e *apiError) *apiError {
	if !strings.HasPrefix(e.Param, "tools[") {
		return e
	}
	out := *e
	out.Param = strings.Replace(e.Param, ".function.", ".", 1)
	out.Message = strings.Replace(e.Message, ".function.", ".", 1)
	return &out
}

// handleResponses serves POST /v1/responses.
func (s *Server) handleResponses(w http.ResponseWriter, r *http.Request) {
	start := s.now()
	var data json.RawMessage
	if e := readJSON(w, r, s.maxBodyBytes, &data); e != nil {
		s.reject(w, s.log, e, e)
		return
	}
	body, e := decodeResponsesRequest(data)
	if e != nil {
		s.reject(w, s.log, e, e)
		return
	}
	info := s.backend.Model()
	req, params, e := body.toEngine(info)
	if e != nil {
		s.reject(w, s.log, e, e)
		return
	}
	c := s.newCall(r, &req, params, info, start, "resp_", "responses")
	s.generate(w, r, req, c, newResponsesFormat(body))
}
