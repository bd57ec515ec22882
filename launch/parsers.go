package launch

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// DefaultStructuredOutputTimeout is how long, in seconds, a request's structured-output
// constraint (a JSON schema, a grammar) may take to compile before the request is refused.
const DefaultStructuredOutputTimeout = 5.0

// checkParsing validates the output-parsing and structured-output options (vLLM's flags).
func checkParsing(opts Options) error {
	switch {
	case opts.EnableAutoToolChoice && opts.ToolCallParser == "":
		return fmt.Errorf("%w: --enable-auto-tool-choice needs --tool-call-parser NAME (vLLM's parser names: hermes, llama3_json, mistral, pythonic, qwen3_xml, openai, ...)", ErrBadOptions)
	case opts.ToolCallParser != "" && !opts.EnableAutoToolChoice:
		return fmt.Errorf("%w: --tool-call-parser %s is used by \"auto\" tool choice only: add --enable-auto-tool-choice", ErrBadOptions, opts.ToolCallParser)
	case opts.StructuredOutputTimeout < 0:
		return fmt.Errorf("%w: --structured-output-timeout %v must be positive (seconds)", ErrBadOptions, opts.StructuredOutputTimeout)
	}
	if t := opts.ChatTemplate; t != "" && !isInlineTemplate(t) {
		if _, err := os.Stat(t); err != nil {
			return fmt.Errorf("%w: --chat-template %s: %v (give a Jinja file, or the template itself)", ErrBadOptions, t, err)
		}
	}
	return nil
}

// isInlineTemplate tells a Jinja template given inline from a file name, as vLLM does.
func isInlineTemplate(s string) bool {
	return strings.ContainsAny(s, "{\n")
}

// parsingArgs writes the parsing options into the engine arguments: the bridge loads the
// parsers (reasoning_parser is also an AsyncEngineArgs field, so vLLM starts structured
// outputs after the reasoning).
func (p *Plan) parsingArgs(opts Options) {
	if opts.EnableAutoToolChoice {
		p.EngineArgs["tool_call_parser"] = opts.ToolCallParser
	}
	if opts.ReasoningParser != "" {
		p.EngineArgs["reasoning_parser"] = opts.ReasoningParser
	}
	if t := opts.ChatTemplate; t != "" {
		if !isInlineTemplate(t) {
			if abs, err := filepath.Abs(t); err == nil {
				t = abs
			}
		}
		p.EngineArgs["chat_template"] = t
	}
	// The backends' default is DefaultStructuredOutputTimeout: only another value is written.
	if t := opts.StructuredOutputTimeout; t != 0 && t != DefaultStructuredOutputTimeout {
		p.EngineArgs["structured_output_timeout"] = t
	}
}
