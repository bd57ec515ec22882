package server

import (
	"bytes"
	"encoding/json"
	"fmt"
	"regexp"

	"github.com/govllm/govllm/llm"
)

// Tools: the request fields tools, tool_choice and parallel_tool_calls, and the tool calls of
// conversation messages.
//
// The tool choice decides who finds the calls in the output:
//   - "auto" (the default when tools are given): the engine's tool-call parser, which the
//     engine must have been started with (llm.ModelInfo.ToolCallParser); the server renders
//     the llm.ToolCallDeltas it delivers.
//   - "required" and a named function: forced through structured outputs, with no parser. The
//     backend constrains the output to a JSON schema built from the tools (forcedSchema), and
//     the server turns that JSON into tool calls itself (forcedcall.go).
//   - "none": no calls. The tools are still given to the chat template, as vLLM does unless
//     started with --exclude-tools-when-tool-choice-none.

// Tool choices.
const (
	toolChoiceNone     = "none"
	toolChoiceAuto     = "auto"
	toolChoiceRequired = "required"
	toolChoiceNamed    = "function" // {"type":"function","function":{"name":...}}
)

// toolCallIDPrefix starts the id of every tool call the server makes (forced calls): vLLM's
// format, "chatcmpl-tool-" and 16 random hex digits.
const toolCallIDPrefix = "chatcmpl-tool-"

// toolNameRE is what OpenAI accepts as a function name.
var toolNameRE = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,64}$`)

// toolDef is an element of "tools".
type toolDef struct {
	Type     string       `json:"type"`
	Function *functionDef `json:"function"`
}

// functionDef is a tool's function.
type functionDef struct {
	Name        string          `json:"name"`
	Description *string         `json:"description"`
	Parameters  json.RawMessage `json:"parameters"`
	Strict      *bool           `json:"strict"`
}

// namedToolChoice is the object form of tool_choice.
type namedToolChoice struct {
	Type     string `json:"type"`
	Function *struct {
		Name string `json:"name"`
	} `json:"function"`
}

// forcedTools says how the server turns a forced choice's output into tool calls: named is the
// function of a named choice (the output is its arguments), empty for "required" (the output
// is an array of {"name", "parameters"}).
type forcedTools struct {
	named string
}

// parseTools decodes and checks "tools"; nil means none were given.
func parseTools(raw json.RawMessage) ([]toolDef, *apiError) {
	if isNull(raw) {
		return nil, nil
	}
	var items []json.RawMessage
	if err := json.Unmarshal(raw, &items); err != nil {
		return nil, badRequest("tools", "tools must be an array of tools.")
	}
	if len(items) == 0 {
		return nil, badRequest("tools", "`tools` must not be an empty array; omit it to send no tools.")
	}
	tools := make([]toolDef, len(items))
	seen := make(map[string]bool, len(items))
	for i, it := range items {
		param := fmt.Sprintf("tools[%d]", i)
		t := &tools[i]
		if err := json.Unmarshal(it, t); err != nil {
			return nil, badRequest(param, "%s must be an object {\"type\":\"function\",\"function\":{...}}.", param)
		}
		if t.Type != "function" {
			return nil, badRequest(param+".type", "%s.type must be \"function\", got %q.", param, t.Type)
		}
		f := t.Function
		if f == nil {
			return nil, badRequest(param+".function", "%s.function is required.", param)
		}
		if !toolNameRE.MatchString(f.Name) {
			return nil, badRequest(param+".function.name",
				"%s.function.name must be 1 to 64 letters, digits, underscores and dashes, got %q.", param, f.Name)
		}
		if seen[f.Name] {
			return nil, badRequest(param+".function.name", "%s.function.name %q is not unique.", param, f.Name)
		}
		seen[f.Name] = true
		if !isNull(f.Parameters) && !isObject(f.Parameters) {
			return nil, badRequest(param+".function.parameters", "%s.function.parameters must be a JSON object (a JSON schema).", param)
		}
	}
	return tools, nil
}

// parseToolChoice decodes "tool_choice": its mode and, for a named choice, the function.
func parseToolChoice(raw json.RawMessage, tools []toolDef) (mode, name string, e *apiError) {
	const param = "tool_choice"
	raw = bytes.TrimSpace(raw)
	if isNull(raw) {
		if tools != nil {
			return toolChoiceAuto, "", nil
		}
		return toolChoiceNone, "", nil
	}
	if tools == nil {
		return "", "", badRequest(param, "When using `tool_choice`, `tools` must be set.")
	}
	if raw[0] == '"' {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return "", "", badRequest(param, "tool_choice is not a valid string: %v.", err)
		}
		switch s {
		case toolChoiceNone, toolChoiceAuto, toolChoiceRequired:
			return s, "", nil
		}
		return "", "", badRequest(param, "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\":\"function\",\"function\":{\"name\":...}}, got %q.", s)
	}
	var nc namedToolChoice
	if err := json.Unmarshal(raw, &nc); err != nil || nc.Type != "function" || nc.Function == nil {
		return "", "", badRequest(param, "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\":\"function\",\"function\":{\"name\":...}}.")
	}
	for _, t := range tools {
		if t.Function.Name == nc.Function.Name {
			return toolChoiceNamed, nc.Function.Name, nil
		}
	}
	return "", "", badRequest(param, "tool_choice names the function %q, which is not in tools.", nc.Function.Name)
}

// applyTools validates the tool fields of c into req and p, after the sampling fields (a
// forced choice sets req.Sampling.StructuredOutputs).
func (c *chatRequest) applyTools(req *llm.Request, p *callParams, m llm.ModelInfo) *apiError {
	if !isNull(c.Functions) || !isNull(c.FunctionCall) {
		param := "functions"
		if isNull(c.Functions) {
			param = "function_call"
		}
		return badRequest(param, "The legacy `functions` and `function_call` are not supported; use `tools` and `tool_choice`.")
	}
	tools, e := parseTools(c.Tools)
	if e != nil {
		return e
	}
	mode, name, e := parseToolChoice(c.ToolChoice, tools)
	if e != nil {
		return e
	}
	if tools == nil {
		return nil
	}
	parallel := c.ParallelToolCalls == nil || *c.ParallelToolCalls
	req.Tools = compactJSON(c.Tools)
	switch mode {
	case toolChoiceNone:
		return nil
	case toolChoiceAuto:
		if m.ToolCallParser == "" {
			return badRequest("tool_choice", "\"auto\" tool choice needs a tool-call parser: start the server with "+
				"--enable-auto-tool-choice --tool-call-parser NAME, or set tool_choice to \"required\", a named function or \"none\".")
		}
		if req.Parsing == nil {
			req.Parsing = &llm.Parsing{}
		}
		req.Parsing.ToolCalls = true
		req.Parsing.Streamed = c.Stream
		if req.Sampling.SkipSpecialTokens == nil {
			// Tool-call markers are often special tokens (<tool_call> in Hermes models): the parser
			// must see them, as vLLM's parsers ask with adjust_request.
			req.Sampling.SkipSpecialTokens = llm.Ptr(false)
		}
		p.singleCall = !parallel
		return nil
	}
	// "required" or named: forced through structured outputs.
	if !m.StructuredOutputs {
		return badRequest("tool_choice", "tool_choice %q needs structured outputs, which this server's backend (%s) does not apply; use \"auto\" or \"none\".",
			choiceLabel(mode, name), backendName(m))
	}
	if so := req.Sampling.StructuredOutputs; so != nil {
		return badRequest(so.Param, "%s cannot be used with tool_choice %q: both constrain the output.", so.Param, choiceLabel(mode, name))
	}
	schema, err := forcedSchema(tools, name, parallel)
	if err != nil {
		return errorf(500, "", "Internal server error")
	}
	req.Sampling.StructuredOutputs = &llm.StructuredOutputs{JSON: schema, Param: "tool_choice"}
	p.forced = &forcedTools{named: name}
	return nil
}

// choiceLabel names a tool choice in messages.
func choiceLabel(mode, name string) string {
	if mode == toolChoiceNamed {
		return "function " + name
	}
	return mode
}

// toolParameters is a tool's parameters schema, {"type":"object"} when it has none.
func toolParameters(f *functionDef) json.RawMessage {
	if isNull(f.Parameters) {
		return json.RawMessage(`{"type":"object"}`)
	}
	return compactJSON(f.Parameters)
}

// forcedSchema is the JSON schema that forces tool calls: for a named function its parameters;
// for "required" an array of at least one (with parallel false, exactly one) object
// {"name": <a tool's name>, "parameters": <that tool's parameters>}, as vLLM builds it.
func forcedSchema(tools []toolDef, named string, parallel bool) (json.RawMessage, error) {
	if named != "" {
		for _, t := range tools {
			if t.Function.Name == named {
				return toolParameters(t.Function), nil
			}
		}
		return nil, fmt.Errorf("server: tool %q not in tools", named)
	}
	anyOf := make([]any, len(tools))
	for i, t := range tools {
		anyOf[i] = map[string]any{
			"type": "object",
			"properties": map[string]any{
				"name":       map[string]any{"type": "string", "enum": []string{t.Function.Name}},
				"parameters": toolParameters(t.Function),
			},
			"required":             []string{"name", "parameters"},
			"additionalProperties": false,
		}
	}
	schema := map[string]any{"type": "array", "minItems": 1, "items": map[string]any{"anyOf": anyOf}}
	if !parallel {
		schema["maxItems"] = 1
	}
	return json.Marshal(schema)
}

// toolCallIn is an element of an assistant message's tool_calls.
type toolCallIn struct {
	ID       string `json:"id"`
	Type     string `json:"type"`
	Function *struct {
		Name      string  `json:"name"`
		Arguments *string `json:"arguments"`
	} `json:"function"`
}

// messageToolCalls decodes the tool_calls of assistant message i.
func messageToolCalls(i int, raw json.RawMessage) ([]llm.ToolCall, *apiError) {
	param := fmt.Sprintf("messages[%d].tool_calls", i)
	if isNull(raw) {
		return nil, nil
	}
	var in []toolCallIn
	if err := json.Unmarshal(raw, &in); err != nil {
		return nil, badRequest(param, "%s must be an array of {\"id\",\"type\":\"function\",\"function\":{\"name\",\"arguments\"}}.", param)
	}
	if len(in) == 0 {
		return nil, nil
	}
	out := make([]llm.ToolCall, len(in))
	for j, tc := range in {
		pj := fmt.Sprintf("%s[%d]", param, j)
		switch {
		case tc.ID == "":
			return nil, badRequest(pj+".id", "%s.id is required.", pj)
		case tc.Type != "" && tc.Type != "function":
			return nil, badRequest(pj+".type", "%s.type must be \"function\", got %q.", pj, tc.Type)
		case tc.Function == nil:
			return nil, badRequest(pj+".function", "%s.function is required.", pj)
		case tc.Function.Name == "":
			return nil, badRequest(pj+".function.name", "%s.function.name is required.", pj)
		case tc.Function.Arguments == nil:
			return nil, badRequest(pj+".function.arguments", "%s.function.arguments is required (a JSON text).", pj)
		case !json.Valid([]byte(*tc.Function.Arguments)):
			return nil, badRequest(pj+".function.arguments", "%s.function.arguments must be a JSON text.", pj)
		}
		out[j] = llm.ToolCall{ID: tc.ID, Type: "function",
			Function: llm.FunctionCall{Name: tc.Function.Name, Arguments: *tc.Function.Arguments}}
	}
	return out, nil
}
