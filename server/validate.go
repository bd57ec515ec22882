package server

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"reflect"
	"strings"
	"unicode/utf8"

	"github.com/govllm/govllm/llm"
)

// Limits on request fields.
const (
	// maxChoices is the largest n a request may ask for.
	maxChoices = 16
	// maxStopStrings is the most stop strings a request may carry (OpenAI allows 4, vLLM any).
	maxStopStrings = 64
)

// maxLogprobs is the most top logprobs per token a request may ask for (OpenAI's and vLLM's
// default limit); the contract's bound.
const maxLogprobs = llm.MaxLogprobs

// chatRequest is the body of POST /v1/chat/completions. Fields the server does not know are
// ignored, as vLLM and OpenAI do.
type chatRequest struct {
	Model               string        `json:"model"`
	Messages            []chatMessage `json:"messages"`
	MaxTokens           *int          `json:"max_tokens"`
	MaxCompletionTokens *int          `json:"max_completion_tokens"`
	Logprobs            bool          `json:"logprobs"`
	TopLogprobs         *int          `json:"top_logprobs"`
	// Tools (tools.go).
	Tools             json.RawMessage `json:"tools"`
	ToolChoice        json.RawMessage `json:"tool_choice"`
	ParallelToolCalls *bool           `json:"parallel_tool_calls"`
	Functions         json.RawMessage `json:"functions"`     // legacy: refused
	FunctionCall      json.RawMessage `json:"function_call"` // legacy: refused
	// Reasoning: include_reasoning false drops the parsed reasoning from the answer;
	// reasoning_effort is refused (the engine takes no chat-template arguments).
	IncludeReasoning *bool           `json:"include_reasoning"`
	ReasoningEffort  json.RawMessage `json:"reasoning_effort"`
	// vLLM's chat extensions (chatfields.go).
	Echo                 bool                       `json:"echo"`
	AddGenerationPrompt  *bool                      `json:"add_generation_prompt"`
	ContinueFinalMessage bool                       `json:"continue_final_message"`
	AddSpecialTokens     bool                       `json:"add_special_tokens"`
	ChatTemplateKwargs   map[string]json.RawMessage `json:"chat_template_kwargs"`
	Documents            []map[string]string        `json:"documents"`
	ChatTemplate         *string                    `json:"chat_template"`
	samplingRequest
}

// samplingRequest holds the fields that chat and text completions share.
type samplingRequest struct {
	Temperature       *float64        `json:"temperature"`
	TopP              *float64        `json:"top_p"`
	TopK              *int            `json:"top_k"`
	MinP              *float64        `json:"min_p"`
	PresencePenalty   *float64        `json:"presence_penalty"`
	FrequencyPenalty  *float64        `json:"frequency_penalty"`
	RepetitionPenalty *float64        `json:"repetition_penalty"`
	MinTokens         *int            `json:"min_tokens"`
	N                 *int            `json:"n"`
	Stop              json.RawMessage `json:"stop"`
	StopTokenIDs      []int32         `json:"stop_token_ids"`
	Seed              *int64          `json:"seed"`
	IgnoreEOS         bool            `json:"ignore_eos"`
	// The text options of vLLM's SamplingParams (Go detokenizes).
	IncludeStopStrInOutput     bool  `json:"include_stop_str_in_output"`
	SkipSpecialTokens          *bool `json:"skip_special_tokens"`
	SpacesBetweenSpecialTokens *bool `json:"spaces_between_special_tokens"`
	// ReturnTokenIDs adds the output token ids to each choice, as vLLM's return_token_ids.
	ReturnTokenIDs bool           `json:"return_token_ids"`
	Stream         bool           `json:"stream"`
	StreamOptions  *streamOptions `json:"stream_options"`
	// User is accepted and ignored, as vLLM does; its type is still checked.
	User          string `json:"user"`
	UseBeamSearch bool   `json:"use_beam_search"`
	// Constraints (structured.go).
	LogitBias         json.RawMessage    `json:"logit_bias"`
	ResponseFormat    *responseFormat    `json:"response_format"`
	StructuredOutputs *structuredOutputs `json:"structured_outputs"`
	AllowedTokenIDs   []int32            `json:"allowed_token_ids"`
	BadWords          []string           `json:"bad_words"`
	// PromptLogprobs is vLLM's prompt_logprobs (chatfields.go).
	PromptLogprobs *int `json:"prompt_logprobs"`
	vllmRefused
}

type streamOptions struct {
	IncludeUsage bool `json:"include_usage"`
	// ContinuousUsageStats adds the usage so far to every chunk, with IncludeUsage only (as vLLM).
	ContinuousUsageStats bool `json:"continuous_usage_stats"`
}

// chatMessage is one message; Content is a string, an array of content parts, or null.
// ToolCalls are an assistant message's calls, ToolCallID the call a tool message answers.
type chatMessage struct {
	Role       string          `json:"role"`
	Content    json.RawMessage `json:"content"`
	Name       string          `json:"name"`
	ToolCalls  json.RawMessage `json:"tool_calls"`
	ToolCallID *string         `json:"tool_call_id"`
}

// contentPart is one element of an array content.
type contentPart struct {
	Type string  `json:"type"`
	Text *string `json:"text"`
}

// readJSON reads the body of r, at most limit bytes, and decodes it into v.
func readJSON(w http.ResponseWriter, r *http.Request, limit int64, v any) *apiError {
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err != nil {
		if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
			return errorf(http.StatusRequestEntityTooLarge, "",
				"Request body too large: the limit is %d bytes.", limit)
		}
		return badRequest("", "Failed to read the request body: %v", err)
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return badRequest("", "The request body is empty; expected a JSON object.")
	}
	if !utf8.Valid(data) {
		return badRequest("", "The request body is not valid UTF-8.")
	}
	if err := json.Unmarshal(data, v); err != nil {
		if se, ok := errors.AsType[*json.SyntaxError](err); ok {
			return badRequest("", "Malformed JSON body at offset %d: %v.", se.Offset, se)
		}
		if te, ok := errors.AsType[*json.UnmarshalTypeError](err); ok {
			if te.Field == "" {
				return badRequest("", "The request body must be a JSON object, got JSON %s.", te.Value)
			}
			// Fields of the embedded samplingRequest are named as the client spells them.
			te.Field = strings.TrimPrefix(te.Field, "samplingRequest.")
			return badRequest(te.Field, "Invalid type for `%s`: expected %s, got JSON %s.",
				te.Field, describeType(te.Type), te.Value)
		}
		return badRequest("", "Malformed JSON body: %v.", err)
	}
	return nil
}

// describeType names a Go type the way a JSON client thinks of it.
func describeType(t reflect.Type) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Bool:
		return "a boolean"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "an integer in range"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.String:
		return "a string"
	case reflect.Slice, reflect.Array:
		return "an array"
	case reflect.Struct, reflect.Map:
		return "an object"
	}
	return t.String()
}

// callParams are the settings of a request that the server itself acts on.
type callParams struct {
	n            int
	stream       bool
	includeUsage bool
	logprobs     bool // the client asked for logprobs: render them (else "logprobs": null)
	tokenIDs     bool // return_token_ids: each choice (and streamed chunk) carries its token ids
	// continuousUsage (stream_options.continuous_usage_stats with include_usage): every chunk
	// carries the usage of its choice so far.
	continuousUsage bool
	// vLLM's extensions (chatfields.go).
	promptLogprobs bool    // the answer carries prompt_logprobs (not streamed)
	echoLogprobs   bool    // text completions with echo and logprobs: prompt logprobs lead each choice's
	topLogprobs    int     // text completions: the logprobs asked for (top entries per token)
	role           string  // chat: the response's role; "" is "assistant"
	chatEcho       *string // chat with echo: the last message's content if its role is the response's ("" if not)
	// Chat only.
	forced        *forcedTools // tool_choice "required" or named: the server makes the calls
	singleCall    bool         // auto tool choice with parallel_tool_calls false: keep call 0 only
	dropReasoning bool         // include_reasoning false
}

// checkModel answers 404 unless name is empty, the served model or one of its LoRA adapters.
func checkModel(name string, m llm.ModelInfo) *apiError {
	if name != "" && name != m.ID && adapterFor(name, m) == "" {
		return errorf(http.StatusNotFound, "model", "The model `%s` does not exist.", name)
	}
	return nil
}

// adapterFor is the LoRA adapter a request's model names: name itself when it is one of the
// engine's adapters, else "" (the base model).
func adapterFor(name string, m llm.ModelInfo) string {
	if name == "" || name == m.ID {
		return ""
	}
	if _, ok := m.Adapter(name); ok {
		return name
	}
	return ""
}

// responseModel is the model a response names: the adapter when the request chose one (as
// vLLM answers), else the served model.
func responseModel(req llm.Request, m llm.ModelInfo) string {
	if req.Adapter != "" {
		return req.Adapter
	}
	return m.ID
}

// toEngine validates c against the served model and converts it into an engine request.
func (c *chatRequest) toEngine(m llm.ModelInfo) (llm.Request, callParams, *apiError) {
	var req llm.Request
	p := callParams{n: 1, stream: c.Stream}
	if err := checkModel(c.Model, m); err != nil {
		return req, p, err
	}
	req.Adapter = adapterFor(c.Model, m)

	if len(c.Messages) == 0 {
		return req, p, badRequest("messages", "`messages` must be a non-empty array.")
	}
	req.Messages = make([]llm.Message, len(c.Messages))
	for i, msg := range c.Messages {
		role, err := messageRole(i, msg.Role)
		if err != nil {
			return req, p, err
		}
		content, err := messageContent(i, role, msg.Content)
		if err != nil {
			return req, p, err
		}
		out := llm.Message{Role: role, Content: content, Name: msg.Name}
		if msg.ToolCalls != nil && !isNull(msg.ToolCalls) {
			if role != "assistant" {
				return req, p, badRequest(fmt.Sprintf("messages[%d].tool_calls", i), "messages[%d].tool_calls: only assistant messages make tool calls.", i)
			}
			if out.ToolCalls, err = messageToolCalls(i, msg.ToolCalls); err != nil {
				return req, p, err
			}
		}
		if role == "tool" {
			if msg.ToolCallID == nil || *msg.ToolCallID == "" {
				return req, p, badRequest(fmt.Sprintf("messages[%d].tool_call_id", i), "messages[%d].tool_call_id is required on a tool message.", i)
			}
			out.ToolCallID = *msg.ToolCallID
		}
		req.Messages[i] = out
	}

	sp := &req.Sampling
	switch {
	case c.MaxCompletionTokens != nil:
		sp.MaxTokens = *c.MaxCompletionTokens
		if err := checkMaxTokens("max_completion_tokens", sp.MaxTokens, m.MaxModelLen); err != nil {
			return req, p, err
		}
	case c.MaxTokens != nil:
		sp.MaxTokens = *c.MaxTokens
		if err := checkMaxTokens("max_tokens", sp.MaxTokens, m.MaxModelLen); err != nil {
			return req, p, err
		}
	}
	if err := c.samplingRequest.apply(sp, &p, m); err != nil {
		return req, p, err
	}
	if t := c.TopLogprobs; t != nil {
		switch {
		case *t < 0:
			return req, p, badRequest("top_logprobs", "Invalid 'top_logprobs': integer below minimum value. Expected a value >= 0, but got %d instead.", *t)
		case *t > maxLogprobs:
			return req, p, badRequest("top_logprobs", "Invalid 'top_logprobs': integer above maximum value. Expected a value <= %d, but got %d instead.", maxLogprobs, *t)
		case *t > 0 && !c.Logprobs:
			return req, p, badRequest("top_logprobs", "Invalid value for 'top_logprobs': 'logprobs' must be set to true when 'top_logprobs' is set.")
		}
	}
	if c.Logprobs {
		top := 0
		if c.TopLogprobs != nil {
			top = *c.TopLogprobs
		}
		sp.Logprobs = &top
		p.logprobs = true
	}
	if !isNull(c.ReasoningEffort) {
		return req, p, badRequest("reasoning_effort", "reasoning_effort is not supported.")
	}
	if m.ReasoningParser != "" {
		req.Parsing = &llm.Parsing{Reasoning: true, Streamed: c.Stream}
	}
	p.dropReasoning = c.IncludeReasoning != nil && !*c.IncludeReasoning
	if err := c.applyTools(&req, &p, m); err != nil {
		return req, p, err
	}
	if err := c.applyChatFields(&req, &p); err != nil {
		return req, p, err
	}
	return req, p, nil
}

// apply validates the shared fields into sp and p; sp.MaxTokens must be set already.
func (c *samplingRequest) apply(sp *llm.SamplingParams, p *callParams, m llm.ModelInfo) *apiError {
	if t := c.Temperature; t != nil {
		if !(*t >= 0 && *t <= llm.MaxTemperature) {
			return badRequest("temperature", "temperature must be in [0, %v], got %v.", llm.MaxTemperature, *t)
		}
		sp.Temperature = t
	}
	if t := c.TopP; t != nil {
		if !(*t > 0 && *t <= 1) {
			return badRequest("top_p", "top_p must be in (0, 1], got %v.", *t)
		}
		sp.TopP = t
	}
	if k := c.TopK; k != nil {
		if *k < -1 {
			return badRequest("top_k", "top_k must be 0 or -1 (disable), or at least 1, got %d.", *k)
		}
		// Sent as set, -1 as 0: both switch top-k off, also against the model's default.
		sp.TopK = llm.Ptr(max(*k, 0))
	}
	if v := c.MinP; v != nil {
		if !(*v >= 0 && *v <= 1) {
			return badRequest("min_p", "min_p must be in [0, 1], got %v.", *v)
		}
		sp.MinP = v
	}
	for _, pen := range []struct {
		name string
		v    *float64
		dst  *float64
	}{
		{"presence_penalty", c.PresencePenalty, &sp.PresencePenalty},
		{"frequency_penalty", c.FrequencyPenalty, &sp.FrequencyPenalty},
	} {
		if pen.v != nil {
			if *pen.v < -2 || *pen.v > 2 {
				return badRequest(pen.name, "%s must be in [-2, 2], got %v.", pen.name, *pen.v)
			}
			*pen.dst = *pen.v
		}
	}
	if v := c.RepetitionPenalty; v != nil {
		if !(*v > 0 && *v <= llm.MaxRepetitionPenalty) {
			return badRequest("repetition_penalty", "repetition_penalty must be in (0, %v], got %v.", llm.MaxRepetitionPenalty, *v)
		}
		sp.RepetitionPenalty = v
	}
	if v := c.MinTokens; v != nil {
		switch {
		case *v < 0:
			return badRequest("min_tokens", "min_tokens must be non-negative, got %d.", *v)
		case sp.MaxTokens > 0 && *v > sp.MaxTokens:
			return badRequest("min_tokens", "min_tokens must be less than or equal to max_tokens=%d, got %d.", sp.MaxTokens, *v)
		}
		sp.MinTokens = *v
	}
	if c.N != nil {
		if *c.N < 1 || *c.N > maxChoices {
			return badRequest("n", "n must be between 1 and %d, got %d.", maxChoices, *c.N)
		}
		p.n = *c.N
	}
	sp.N = p.n

	stop, err := parseStop(c.Stop)
	if err != nil {
		return err
	}
	sp.Stop = stop
	for _, id := range c.StopTokenIDs {
		if id < 0 {
			return badRequest("stop_token_ids", "stop_token_ids must be non-negative, got %d.", id)
		}
	}
	sp.StopTokenIDs = c.StopTokenIDs
	sp.Seed = c.Seed
	sp.IgnoreEOS = c.IgnoreEOS
	p.tokenIDs = c.ReturnTokenIDs
	sp.IncludeStopStrInOutput = c.IncludeStopStrInOutput
	sp.SkipSpecialTokens = c.SkipSpecialTokens
	sp.SpacesBetweenSpecialTokens = c.SpacesBetweenSpecialTokens

	if c.StreamOptions != nil {
		if !c.Stream {
			return badRequest("stream_options", "Stream options can only be defined when `stream=True`.")
		}
		p.includeUsage = c.StreamOptions.IncludeUsage
		p.continuousUsage = c.StreamOptions.IncludeUsage && c.StreamOptions.ContinuousUsageStats
	}
	if c.UseBeamSearch {
		return badRequest("use_beam_search", "beam search is not supported.")
	}
	if err := c.vllmRefused.check(); err != nil {
		return err
	}
	if err := c.applyPromptLogprobs(sp, p); err != nil {
		return err
	}
	return c.constraints(sp, m)
}

// messageRole checks the role of message i and maps "developer" to "system", which chat
// templates know.
func messageRole(i int, role string) (string, *apiError) {
	switch role {
	case "system", "user", "assistant", "tool":
		return role, nil
	case "developer":
		return "system", nil
	case "":
		return "", badRequest(fmt.Sprintf("messages[%d].role", i), "messages[%d].role is required.", i)
	case "function":
		return "", badRequest(fmt.Sprintf("messages[%d].role", i),
			"messages[%d].role \"function\" (legacy function calling) is not supported; use tool messages.", i)
	}
	return "", badRequest(fmt.Sprintf("messages[%d].role", i),
		"messages[%d].role must be one of system, developer, user, assistant and tool, got %q.", i, role)
}

// messageContent returns the text of message i: a string, or the text parts of an array
// joined with "\n" as vLLM does. Only an assistant message may have null content.
func messageContent(i int, role string, raw json.RawMessage) (string, *apiError) {
	param := fmt.Sprintf("messages[%d].content", i)
	raw = bytes.TrimSpace(raw)
	switch {
	case len(raw) == 0 || bytes.Equal(raw, []byte("null")):
		if role == "assistant" {
			return "", nil
		}
		return "", badRequest(param, "%s is required.", param)
	case raw[0] == '"':
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return "", badRequest(param, "%s is not a valid string: %v.", param, err)
		}
		return s, nil
	case raw[0] == '[':
		var parts []contentPart
		if err := json.Unmarshal(raw, &parts); err != nil {
			return "", badRequest(param, "%s must be a string or an array of text parts.", param)
		}
		var b strings.Builder
		for j, part := range parts {
			if part.Type != "text" {
				return "", badRequest(param, "%s[%d]: only content parts of type \"text\" are supported, got %q.",
					param, j, part.Type)
			}
			if part.Text == nil {
				return "", badRequest(param, "%s[%d].text is required.", param, j)
			}
			if j > 0 {
				b.WriteByte('\n')
			}
			b.WriteString(*part.Text)
		}
		return b.String(), nil
	}
	return "", badRequest(param, "%s must be a string or an array of text parts.", param)
}

// checkMaxTokens checks the output token limit named param.
func checkMaxTokens(param string, v, maxModelLen int) *apiError {
	if v < 1 {
		return badRequest(param, "%s must be at least 1, got %d.", param, v)
	}
	if maxModelLen > 0 && v > maxModelLen {
		return badRequest(param, "%s=%d cannot be greater than max_model_len=%d.", param, v, maxModelLen)
	}
	return nil
}

// parseStop decodes "stop": null, a string, or an array of strings.
func parseStop(raw json.RawMessage) ([]string, *apiError) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return nil, nil
	}
	var stop []string
	if raw[0] == '"' {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, badRequest("stop", "stop is not a valid string: %v.", err)
		}
		stop = []string{s}
	} else if err := json.Unmarshal(raw, &stop); err != nil {
		return nil, badRequest("stop", "stop must be a string or an array of strings.")
	}
	if len(stop) > maxStopStrings {
		return nil, badRequest("stop", "stop may hold at most %d strings, got %d.", maxStopStrings, len(stop))
	}
	for _, s := range stop {
		if s == "" {
			return nil, badRequest("stop", "stop cannot contain an empty string.")
		}
	}
	return stop, nil
}
