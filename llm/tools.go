package llm

import "encoding/json"

// ToolCall is a function call an assistant message made (OpenAI's shape), sent back to the
// model in later turns.
type ToolCall struct {
	ID       string       `json:"id"`
	Type     string       `json:"type"` // "function"
	Function FunctionCall `json:"function"`
}

// FunctionCall names a function and carries its arguments as a JSON text.
type FunctionCall struct {
	Name      string `json:"name"`
	Arguments string `json:"arguments"`
}

// ToolCallDelta is a piece of a streamed tool call: the first piece of call Index carries ID,
// Type and Name, later pieces only Arguments, whose fragments concatenate to the arguments'
// JSON text (OpenAI's incremental shape).
type ToolCallDelta struct {
	Index     int
	ID        string
	Type      string
	Name      string
	Arguments string
}

// StructuredOutputs constrains the text of every choice of a request: exactly one of JSON,
// JSONObject, Regex, Choice and Grammar is set (vLLM's StructuredOutputsParams).
type StructuredOutputs struct {
	// JSON is a JSON schema the output must validate against.
	JSON json.RawMessage `json:"json,omitempty"`
	// JSONObject asks for any JSON object.
	JSONObject bool `json:"json_object,omitempty"`
	// Regex is a regular expression the whole output must match.
	Regex string `json:"regex,omitempty"`
	// Choice lists the only outputs allowed.
	Choice []string `json:"choice,omitempty"`
	// Grammar is a context-free grammar (EBNF as xgrammar and vLLM take it, or Lark).
	Grammar string `json:"grammar,omitempty"`
	// Param names the request field the constraint came from, so that an error about it (a
	// schema that cannot compile) names what the client sent.
	Param string `json:"param,omitempty"`
}

// Set reports how many of the constraints are set; a valid StructuredOutputs has one.
func (s *StructuredOutputs) Set() int {
	n := 0
	if len(s.JSON) > 0 {
		n++
	}
	if s.JSONObject {
		n++
	}
	if s.Regex != "" {
		n++
	}
	if s.Choice != nil {
		n++
	}
	if s.Grammar != "" {
		n++
	}
	return n
}

// Parsing asks the engine to split each choice's text with the parsers the engine was started
// with (vLLM's tool-call and reasoning parsers): content goes to Delta.Text, reasoning to
// Delta.Reasoning, tool calls to Delta.ToolCalls. Only requests that set it pay for parsing.
type Parsing struct {
	// ToolCalls parses tool calls out of the text ("auto" tool choice); needs Request.Tools and
	// an engine started with a tool-call parser.
	ToolCalls bool `json:"tool_calls,omitempty"`
	// Reasoning splits the reasoning off the text; needs an engine started with a reasoning parser.
	Reasoning bool `json:"reasoning,omitempty"`
	// Streamed parses delta by delta (the increments a streamed response writes); else the whole
	// text of a choice is parsed once it finished, in one delta.
	Streamed bool `json:"streamed,omitempty"`
}
