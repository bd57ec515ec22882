package server

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/packages/ssestream"
	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/llm"
)

// fullInfo is a model whose engine has a tool-call parser, a reasoning parser and structured
// outputs.
var fullInfo = func() llm.ModelInfo {
	m := testInfo
	m.ToolCallParser, m.ReasoningParser, m.StructuredOutputs = "hermes", "qwen3", true
	return m
}()

// soInfo is a model with structured outputs and no parsers.
var soInfo = func() llm.ModelInfo { m := testInfo; m.StructuredOutputs = true; return m }()

const (
	toolWeather = `{"type":"function","function":{"name":"get_weather","description":"d","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}`
	toolTime    = `{"type":"function","function":{"name":"get_time"}}`
	twoTools    = `"tools":[` + toolWeather + `,` + toolTime + `]`
	userHi      = `"messages":[{"role":"user","content":"hi"}]`
)

// recordingBackend answers with the deltas and records the request it got.
func recordingBackend(info llm.ModelInfo, got *llm.Request, deltas ...llm.Delta) *fakeBackend {
	b := backendWith(scripted(llm.Usage{PromptTokens: 3, CompletionTokens: 2}, nil, deltas...), got)
	b.info = info
	return b
}

func TestToolAndConstraintBadRequests(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		info  llm.ModelInfo
		path  string // chat when empty
		body  string
		param string
		msg   string // a part of the message, if set
	}{
		{name: "empty tools", info: fullInfo, body: `{` + userHi + `,"tools":[]}`, param: "tools", msg: "must not be an empty array"},
		{name: "logit_bias without constraints", info: testInfo, body: `{` + userHi + `,"logit_bias":{"1":5}}`, param: "logit_bias", msg: "does not apply token constraints"},
		{name: "bad_words without constraints", info: testInfo, body: `{` + userHi + `,"bad_words":["w"]}`, param: "bad_words", msg: "does not apply token constraints"},
		{name: "tools not an array", info: fullInfo, body: `{` + userHi + `,"tools":{}}`, param: "tools"},
		{name: "tool type", info: fullInfo, body: `{` + userHi + `,"tools":[{"type":"code","function":{"name":"f"}}]}`, param: "tools[0].type"},
		{name: "tool without function", info: fullInfo, body: `{` + userHi + `,"tools":[{"type":"function"}]}`, param: "tools[0].function"},
		{name: "tool name empty", info: fullInfo, body: `{` + userHi + `,"tools":[{"type":"function","function":{"name":""}}]}`, param: "tools[0].function.name"},
		{name: "tool name bad chars", info: fullInfo, body: `{` + userHi + `,"tools":[` + toolTime + `,{"type":"function","function":{"name":"a b"}}]}`, param: "tools[1].function.name"},
		{name: "tool name too long", info: fullInfo, body: `{` + userHi + `,"tools":[{"type":"function","function":{"name":"` + strings.Repeat("a", 65) + `"}}]}`, param: "tools[0].function.name"},
		{name: "tool name repeated", info: fullInfo, body: `{` + userHi + `,"tools":[` + toolTime + `,` + toolTime + `]}`, param: "tools[1].function.name"},
		{name: "parameters not an object", info: fullInfo, body: `{` + userHi + `,"tools":[{"type":"function","function":{"name":"f","parameters":[1]}}]}`, param: "tools[0].function.parameters"},
		{name: "tool_choice without tools", info: fullInfo, body: `{` + userHi + `,"tool_choice":"auto"}`, param: "tool_choice", msg: "When using `tool_choice`, `tools` must be set."},
		{name: "tool_choice none without tools", info: fullInfo, body: `{` + userHi + `,"tool_choice":"none"}`, param: "tool_choice"},
		{name: "tool_choice unknown string", info: fullInfo, body: `{` + userHi + `,` + twoTools + `,"tool_choice":"any"}`, param: "tool_choice"},
		{name: "tool_choice bad object", info: fullInfo, body: `{` + userHi + `,` + twoTools + `,"tool_choice":{"type":"function"}}`, param: "tool_choice"},
		{name: "named tool not in tools", info: fullInfo, body: `{` + userHi + `,` + twoTools + `,"tool_choice":{"type":"function","function":{"name":"nope"}}}`, param: "tool_choice", msg: "nope"},
		{name: "auto without a parser", info: soInfo, body: `{` + userHi + `,` + twoTools + `}`, param: "tool_choice", msg: "--enable-auto-tool-choice --tool-call-parser"},
		{name: "explicit auto without a parser", info: soInfo, body: `{` + userHi + `,` + twoTools + `,"tool_choice":"auto"}`, param: "tool_choice"},
		{name: "required without structured outputs", info: testInfo, body: `{` + userHi + `,` + twoTools + `,"tool_choice":"required"}`, param: "tool_choice"},
		{name: "named without structured outputs", info: testInfo, body: `{` + userHi + `,` + twoTools + `,"tool_choice":{"type":"function","function":{"name":"get_time"}}}`, param: "tool_choice"},
		{name: "required with response_format", info: fullInfo, body: `{` + userHi + `,` + twoTools + `,"tool_choice":"required","response_format":{"type":"json_object"}}`, param: "response_format"},
		{name: "named with structured_outputs", info: fullInfo, body: `{` + userHi + `,` + twoTools + `,"tool_choice":{"type":"function","function":{"name":"get_time"}},"structured_outputs":{"regex":"a"}}`, param: "structured_outputs"},
		{name: "legacy functions", info: fullInfo, body: `{` + userHi + `,"functions":[{"name":"f"}]}`, param: "functions"},
		{name: "function role", info: fullInfo, body: `{"messages":[{"role":"function","name":"f","content":"x"}]}`, param: "messages[0].role"},
		{name: "tool message without id", info: fullInfo, body: `{"messages":[{"role":"tool","content":"x"}]}`, param: "messages[0].tool_call_id"},
		{name: "tool message without content", info: fullInfo, body: `{"messages":[{"role":"tool","tool_call_id":"c1"}]}`, param: "messages[0].content"},
		{name: "tool_calls on a user message", info: fullInfo, body: `{"messages":[{"role":"user","content":"x","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]}]}`, param: "messages[0].tool_calls"},
		{name: "tool call without id", info: fullInfo, body: `{"messages":[{"role":"assistant","tool_calls":[{"type":"function","function":{"name":"f","arguments":"{}"}}]}]}`, param: "messages[0].tool_calls[0].id"},
		{name: "tool call arguments an object", info: fullInfo, body: `{"messages":[{"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":{}}}]}]}`, param: "messages[0].tool_calls"},
		{name: "tool call arguments not JSON", info: fullInfo, body: `{"messages":[{"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{"}}]}]}`, param: "messages[0].tool_calls[0].function.arguments"},
		{name: "tool call without name", info: fullInfo, body: `{"messages":[{"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"arguments":"{}"}}]}]}`, param: "messages[0].tool_calls[0].function.name"},
		{name: "reasoning_effort", info: fullInfo, body: `{` + userHi + `,"reasoning_effort":"low"}`, param: "reasoning_effort", msg: "not supported"},
		{name: "include_reasoning not a bool", info: fullInfo, body: `{` + userHi + `,"include_reasoning":"no"}`, param: "include_reasoning"},

		{name: "response_format without structured outputs", info: testInfo, body: `{` + userHi + `,"response_format":{"type":"json_object"}}`, param: "response_format"},
		{name: "structured_outputs without structured outputs", info: testInfo, body: `{` + userHi + `,"structured_outputs":{"regex":"a+"}}`, param: "structured_outputs"},
		{name: "response_format unknown type", info: soInfo, body: `{` + userHi + `,"response_format":{"type":"xml"}}`, param: "response_format.type"},
		{name: "response_format no type", info: soInfo, body: `{` + userHi + `,"response_format":{}}`, param: "response_format.type"},
		{name: "json_schema missing", info: soInfo, body: `{` + userHi + `,"response_format":{"type":"json_schema"}}`, param: "response_format.json_schema"},
		{name: "json_schema without name", info: soInfo, body: `{` + userHi + `,"response_format":{"type":"json_schema","json_schema":{"schema":{}}}}`, param: "response_format.json_schema.name"},
		{name: "json_schema schema not an object", info: soInfo, body: `{` + userHi + `,"response_format":{"type":"json_schema","json_schema":{"name":"n","schema":"x"}}}`, param: "response_format.json_schema.schema"},
		{name: "structural_tag", info: soInfo, body: `{` + userHi + `,"response_format":{"type":"structural_tag"}}`, param: "response_format"},
		{name: "both constraints", info: soInfo, body: `{` + userHi + `,"response_format":{"type":"json_object"},"structured_outputs":{"regex":"a"}}`, param: "structured_outputs"},
		{name: "structured_outputs none set", info: soInfo, body: `{` + userHi + `,"structured_outputs":{}}`, param: "structured_outputs"},
		{name: "structured_outputs two set", info: soInfo, body: `{` + userHi + `,"structured_outputs":{"regex":"a","choice":["a"]}}`, param: "structured_outputs"},
		{name: "structured_outputs empty choice", info: soInfo, body: `{` + userHi + `,"structured_outputs":{"choice":[]}}`, param: "structured_outputs.choice"},
		{name: "structured_outputs json not a schema", info: soInfo, body: `{` + userHi + `,"structured_outputs":{"json":"[1]"}}`, param: "structured_outputs.json"},
		{name: "structured_outputs whitespace_pattern", info: soInfo, body: `{` + userHi + `,"structured_outputs":{"regex":"a","whitespace_pattern":" "}}`, param: "structured_outputs.whitespace_pattern"},
		{name: "structured_outputs disable_any_whitespace", info: soInfo, body: `{` + userHi + `,"structured_outputs":{"regex":"a","disable_any_whitespace":true}}`, param: "structured_outputs.disable_any_whitespace"},
		{name: "completions response_format without support", info: testInfo, path: "/v1/completions", body: `{"prompt":"p","response_format":{"type":"json_object"}}`, param: "response_format"},
		{name: "completions structured_outputs two set", info: soInfo, path: "/v1/completions", body: `{"prompt":"p","structured_outputs":{"grammar":"g","json_object":true}}`, param: "structured_outputs"},

		{name: "logit_bias key not an integer", info: testInfo, body: `{` + userHi + `,"logit_bias":{"a":1}}`, param: "logit_bias"},
		{name: "logit_bias key fraction", info: testInfo, body: `{` + userHi + `,"logit_bias":{"1.5":1}}`, param: "logit_bias"},
		{name: "logit_bias key negative", info: testInfo, body: `{` + userHi + `,"logit_bias":{"-1":1}}`, param: "logit_bias"},
		{name: "logit_bias value too big", info: testInfo, body: `{` + userHi + `,"logit_bias":{"5":100.5}}`, param: "logit_bias"},
		{name: "logit_bias value a string", info: testInfo, body: `{` + userHi + `,"logit_bias":{"5":"1"}}`, param: "logit_bias"},
		{name: "logit_bias an array", info: testInfo, body: `{` + userHi + `,"logit_bias":[1]}`, param: "logit_bias"},
		{name: "completions logit_bias", info: testInfo, path: "/v1/completions", body: `{"prompt":"p","logit_bias":{"5":-101}}`, param: "logit_bias"},
		{name: "allowed_token_ids negative", info: testInfo, body: `{` + userHi + `,"allowed_token_ids":[1,-1]}`, param: "allowed_token_ids"},
		{name: "allowed_token_ids empty", info: testInfo, body: `{` + userHi + `,"allowed_token_ids":[]}`, param: "allowed_token_ids"},
		{name: "allowed_token_ids strings", info: testInfo, body: `{` + userHi + `,"allowed_token_ids":["a"]}`, param: "allowed_token_ids"},
		{name: "bad_words empty string", info: testInfo, path: "/v1/completions", body: `{"prompt":"p","bad_words":[""]}`, param: "bad_words"},
		{name: "bad_words not strings", info: testInfo, body: `{` + userHi + `,"bad_words":[1]}`, param: "bad_words"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := &fakeBackend{info: tt.info, generateFn: func(context.Context, llm.Request) (llm.TokenStream, error) {
				t.Error("Generate called for a bad request")
				return nil, llm.ErrClosed
			}}
			path := tt.path
			if path == "" {
				path = "/v1/chat/completions"
			}
			rec := do(newTestServer(t, b), http.MethodPost, path, tt.body)
			msg := requireError(t, rec, http.StatusBadRequest, "BadRequestError", tt.param)
			require.Contains(t, msg, tt.msg)
		})
	}
}

func TestToolAndConstraintMapping(t *testing.T) {
	t.Parallel()
	compactTools := `[` + toolWeather + `,` + toolTime + `]`
	weatherParams := `{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}`
	tests := []struct {
		name  string
		info  llm.ModelInfo
		path  string
		body  string
		check func(t *testing.T, got llm.Request)
	}{
		{
			name: "auto, streamed", info: fullInfo,
			body: `{` + userHi + `,` + twoTools + `,"stream":true}`,
			check: func(t *testing.T, got llm.Request) {
				require.JSONEq(t, compactTools, string(got.Tools))
				require.Equal(t, &llm.Parsing{ToolCalls: true, Reasoning: true, Streamed: true}, got.Parsing)
				require.Nil(t, got.Sampling.StructuredOutputs)
			},
		},
		{
			name: "auto with response_format: both passed", info: fullInfo,
			body: `{` + userHi + `,` + twoTools + `,"tool_choice":"auto","response_format":{"type":"json_object"}}`,
			check: func(t *testing.T, got llm.Request) {
				require.Equal(t, &llm.Parsing{ToolCalls: true, Reasoning: true}, got.Parsing)
				require.Equal(t, &llm.StructuredOutputs{JSONObject: true, Param: "response_format"}, got.Sampling.StructuredOutputs)
			},
		},
		{
			name: "none: tools still rendered, nothing parsed", info: soInfo,
			body: `{` + userHi + `,` + twoTools + `,"tool_choice":"none"}`,
			check: func(t *testing.T, got llm.Request) {
				require.JSONEq(t, compactTools, string(got.Tools))
				require.Nil(t, got.Parsing)
				require.Nil(t, got.Sampling.StructuredOutputs)
			},
		},
		{
			name: "named: the tool's parameters", info: soInfo,
			body: `{` + userHi + `,` + twoTools + `,"tool_choice":{"type":"function","function":{"name":"get_weather"}}}`,
			check: func(t *testing.T, got llm.Request) {
				require.Nil(t, got.Parsing)
				so := got.Sampling.StructuredOutputs
				require.Equal(t, "tool_choice", so.Param)
				require.JSONEq(t, weatherParams, string(so.JSON))
			},
		},
		{
			name: "named without parameters: any object", info: soInfo,
			body: `{` + userHi + `,` + twoTools + `,"tool_choice":{"type":"function","function":{"name":"get_time"}}}`,
			check: func(t *testing.T, got llm.Request) {
				require.JSONEq(t, `{"type":"object"}`, string(got.Sampling.StructuredOutputs.JSON))
			},
		},
		{
			name: "required", info: soInfo,
			body: `{` + userHi + `,` + twoTools + `,"tool_choice":"required"}`,
			check: func(t *testing.T, got llm.Request) {
				so := got.Sampling.StructuredOutputs
				require.Equal(t, "tool_choice", so.Param)
				require.JSONEq(t, `{"type":"array","minItems":1,"items":{"anyOf":[
					{"type":"object","properties":{"name":{"type":"string","enum":["get_weather"]},"parameters":`+weatherParams+`},
					 "required":["name","parameters"],"additionalProperties":false},
					{"type":"object","properties":{"name":{"type":"string","enum":["get_time"]},"parameters":{"type":"object"}},
					 "required":["name","parameters"],"additionalProperties":false}]}}`, string(so.JSON))
			},
		},
		{
			name: "required, one call at most", info: soInfo,
			body: `{` + userHi + `,` + twoTools + `,"tool_choice":"required","parallel_tool_calls":false}`,
			check: func(t *testing.T, got llm.Request) {
				var s map[string]any
				require.NoError(t, json.Unmarshal(got.Sampling.StructuredOutputs.JSON, &s))
				require.Equal(t, 1.0, s["maxItems"])
				require.Equal(t, 1.0, s["minItems"])
			},
		},
		{
			name: "conversation with tool calls", info: fullInfo,
			body: `{"messages":[{"role":"user","content":"w?"},
				{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},
				{"role":"tool","tool_call_id":"c1","name":"get_weather","content":[{"type":"text","text":"sunny"}]}]}`,
			check: func(t *testing.T, got llm.Request) {
				require.Equal(t, []llm.Message{
					{Role: "user", Content: "w?"},
					{Role: "assistant", ToolCalls: []llm.ToolCall{{ID: "c1", Type: "function",
						Function: llm.FunctionCall{Name: "get_weather", Arguments: `{"city":"Paris"}`}}}},
					{Role: "tool", Content: "sunny", ToolCallID: "c1", Name: "get_weather"},
				}, got.Messages)
				require.Nil(t, got.Tools)
				require.Equal(t, &llm.Parsing{Reasoning: true}, got.Parsing, "a reasoning parser parses every chat request")
			},
		},
		{
			name: "json_schema", info: soInfo,
			body: `{` + userHi + `,"response_format":{"type":"json_schema","json_schema":{"name":"n","strict":true,"schema":{"type": "object"}}}}`,
			check: func(t *testing.T, got llm.Request) {
				require.Equal(t, &llm.StructuredOutputs{JSON: json.RawMessage(`{"type":"object"}`), Param: "response_format"}, got.Sampling.StructuredOutputs)
			},
		},
		{
			name: "response_format text: no constraint", info: testInfo,
			body:  `{` + userHi + `,"response_format":{"type":"text"}}`,
			check: func(t *testing.T, got llm.Request) { require.Nil(t, got.Sampling.StructuredOutputs) },
		},
		{
			name: "structured_outputs json as a string", info: soInfo,
			body: `{` + userHi + `,"structured_outputs":{"json":"{\"type\": \"object\"}"}}`,
			check: func(t *testing.T, got llm.Request) {
				require.Equal(t, &llm.StructuredOutputs{JSON: json.RawMessage(`{"type":"object"}`), Param: "structured_outputs"}, got.Sampling.StructuredOutputs)
			},
		},
		{
			name: "structured_outputs choice, completions", info: soInfo, path: "/v1/completions",
			body: `{"prompt":"p","structured_outputs":{"choice":["yes","no"],"disable_any_whitespace":false}}`,
			check: func(t *testing.T, got llm.Request) {
				require.Equal(t, &llm.StructuredOutputs{Choice: []string{"yes", "no"}, Param: "structured_outputs"}, got.Sampling.StructuredOutputs)
			},
		},
		{
			name: "response_format, completions", info: soInfo, path: "/v1/completions",
			body: `{"prompt":"p","response_format":{"type":"json_object"}}`,
			check: func(t *testing.T, got llm.Request) {
				require.Equal(t, &llm.StructuredOutputs{JSONObject: true, Param: "response_format"}, got.Sampling.StructuredOutputs)
				require.Nil(t, got.Parsing, "text completions are not parsed")
			},
		},
		{
			name: "token constraints", info: soInfo,
			body: `{` + userHi + `,"logit_bias":{"5":-100,"50256":2.5,"7":100},"allowed_token_ids":[1,2],"bad_words":["x","y z"]}`,
			check: func(t *testing.T, got llm.Request) {
				require.Equal(t, map[int32]float64{5: -100, 50256: 2.5, 7: 100}, got.Sampling.LogitBias)
				require.Equal(t, []int32{1, 2}, got.Sampling.AllowedTokenIDs)
				require.Equal(t, []string{"x", "y z"}, got.Sampling.BadWords)
			},
		},
		{
			name: "token constraints, completions", info: soInfo, path: "/v1/completions",
			body: `{"prompt":"p","logit_bias":{"0":1},"allowed_token_ids":[0],"bad_words":["w"]}`,
			check: func(t *testing.T, got llm.Request) {
				require.Equal(t, map[int32]float64{0: 1}, got.Sampling.LogitBias)
				require.Equal(t, []int32{0}, got.Sampling.AllowedTokenIDs)
				require.Equal(t, []string{"w"}, got.Sampling.BadWords)
			},
		},
		{
			name: "empty logit_bias: none", info: testInfo,
			body: `{` + userHi + `,"logit_bias":{},"include_reasoning":false,"reasoning_effort":null}`,
			check: func(t *testing.T, got llm.Request) {
				require.Nil(t, got.Sampling.LogitBias)
				require.Nil(t, got.Parsing)
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var got llm.Request
			s := newTestServer(t, recordingBackend(tt.info, &got, llm.Delta{FinishReason: "stop"}))
			path := tt.path
			if path == "" {
				path = "/v1/chat/completions"
			}
			rec := do(s, http.MethodPost, path, tt.body)
			require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
			require.NoError(t, got.Validate())
			tt.check(t, got)
		})
	}
}

// sdkStream decodes a streamed chat answer with the openai-go SDK and accumulates it.
func sdkStream(t *testing.T, s http.Handler, body string) openai.ChatCompletionAccumulator {
	t.Helper()
	rec := do(s, http.MethodPost, "/v1/chat/completions", body)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	stream := ssestream.NewStream[openai.ChatCompletionChunk](ssestream.NewDecoder(rec.Result()), nil)
	var acc openai.ChatCompletionAccumulator
	for stream.Next() {
		require.True(t, acc.AddChunk(stream.Current()), "the accumulator takes every chunk")
	}
	require.NoError(t, stream.Err())
	require.NoError(t, stream.Close())
	return acc
}

// engineToolDeltas is what the engine delivers for an auto tool choice, streamed: reasoning,
// content, then two calls whose arguments come in fragments.
var engineToolDeltas = []llm.Delta{
	{Reasoning: "The user wants ", TokenIDs: []int32{1}},
	{Reasoning: "weather.", TokenIDs: []int32{2}},
	{Text: "Let me check.", TokenIDs: []int32{3}},
	{ToolCalls: []llm.ToolCallDelta{{Index: 0, ID: "chatcmpl-tool-a", Type: "function", Name: "get_weather"}}, TokenIDs: []int32{4}},
	{ToolCalls: []llm.ToolCallDelta{{Index: 0, Arguments: `{"city": `}}, TokenIDs: []int32{5}},
	{ToolCalls: []llm.ToolCallDelta{{Index: 0, Arguments: `"Paris"}`}, {Index: 1, ID: "chatcmpl-tool-b", Type: "function", Name: "get_time"}}, TokenIDs: []int32{6}},
	{ToolCalls: []llm.ToolCallDelta{{Index: 1, Arguments: `{}`}}, FinishReason: "tool_calls", TokenIDs: []int32{7}},
}

func TestEngineToolCallsStream(t *testing.T) {
	t.Parallel()
	t.Run("bytes", func(t *testing.T) {
		t.Parallel()
		s := newTestServer(t, recordingBackend(fullInfo, nil, engineToolDeltas...))
		rec := do(s, http.MethodPost, "/v1/chat/completions", `{`+userHi+`,`+twoTools+`,"stream":true}`)
		require.Equal(t, http.StatusOK, rec.Code)
		require.Equal(t, strings.Join([]string{
			roleChunk(0),
			chunk(0, `{"reasoning":"The user wants "}`, "null"),
			chunk(0, `{"reasoning":"weather."}`, "null"),
			textChunk(0, "Let me check."),
			chunk(0, `{"tool_calls":[{"index":0,"id":"chatcmpl-tool-a","type":"function","function":{"name":"get_weather","arguments":""}}]}`, "null"),
			chunk(0, `{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\": "}}]}`, "null"),
			chunk(0, `{"tool_calls":[{"index":0,"function":{"arguments":"\"Paris\"}"}},{"index":1,"id":"chatcmpl-tool-b","type":"function","function":{"name":"get_time","arguments":""}}]}`, "null"),
			chunk(0, `{"tool_calls":[{"index":1,"function":{"arguments":"{}"}}]}`, "null"),
			finishChunk(0, "tool_calls"),
			doneEvent,
		}, ""), rec.Body.String())
	})
	t.Run("sdk", func(t *testing.T) {
		t.Parallel()
		s := newTestServer(t, recordingBackend(fullInfo, nil, engineToolDeltas...))
		acc := sdkStream(t, s, `{`+userHi+`,`+twoTools+`,"stream":true}`)
		require.Len(t, acc.Choices, 1)
		msg := acc.Choices[0].Message
		require.Equal(t, "Let me check.", msg.Content)
		require.Equal(t, "tool_calls", acc.Choices[0].FinishReason)
		require.Len(t, msg.ToolCalls, 2)
		require.Equal(t, "chatcmpl-tool-a", msg.ToolCalls[0].ID)
		require.Equal(t, "get_weather", msg.ToolCalls[0].Function.Name)
		require.JSONEq(t, `{"city":"Paris"}`, msg.ToolCalls[0].Function.Arguments)
		require.Equal(t, "get_time", msg.ToolCalls[1].Function.Name)
		require.Equal(t, `{}`, msg.ToolCalls[1].Function.Arguments)
	})
	t.Run("include_reasoning false, parallel_tool_calls false", func(t *testing.T) {
		t.Parallel()
		s := newTestServer(t, recordingBackend(fullInfo, nil, engineToolDeltas...))
		rec := do(s, http.MethodPost, "/v1/chat/completions", `{`+userHi+`,`+twoTools+`,"stream":true,"include_reasoning":false,"parallel_tool_calls":false}`)
		require.Equal(t, http.StatusOK, rec.Code)
		require.NotContains(t, rec.Body.String(), "reasoning")
		require.NotContains(t, rec.Body.String(), "get_time")
		require.Contains(t, rec.Body.String(), "get_weather")
	})
}

func TestEngineToolCallsNonStream(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		body   string
		deltas []llm.Delta
		want   string // the choice's message
		finish string
	}{
		{
			name: "calls, reasoning, no content",
			body: `{` + userHi + `,` + twoTools + `}`,
			deltas: []llm.Delta{{Reasoning: "think", ToolCalls: []llm.ToolCallDelta{
				{Index: 0, ID: "chatcmpl-tool-a", Type: "function", Name: "get_weather", Arguments: `{"city":"Paris"}`},
				{Index: 1, ID: "chatcmpl-tool-b", Type: "function", Name: "get_time", Arguments: `{}`},
			}, FinishReason: "tool_calls"}},
			want: `{"role":"assistant","content":null,"reasoning":"think","tool_calls":[
				{"id":"chatcmpl-tool-a","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}},
				{"id":"chatcmpl-tool-b","type":"function","function":{"name":"get_time","arguments":"{}"}}]}`,
			finish: "tool_calls",
		},
		{
			name:   "content and reasoning, no calls",
			body:   `{` + userHi + `}`,
			deltas: []llm.Delta{{Reasoning: "hm", Text: "Hello"}, {Text: "!", FinishReason: "stop"}},
			want:   `{"role":"assistant","content":"Hello!","reasoning":"hm","tool_calls":[]}`,
			finish: "stop",
		},
		{
			name:   "include_reasoning false",
			body:   `{` + userHi + `,"include_reasoning":false}`,
			deltas: []llm.Delta{{Reasoning: "hm", Text: "Hello", FinishReason: "stop"}},
			want:   `{"role":"assistant","content":"Hello","tool_calls":[]}`,
			finish: "stop",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var got llm.Request
			s := newTestServer(t, recordingBackend(fullInfo, &got, tt.deltas...))
			rec := do(s, http.MethodPost, "/v1/chat/completions", tt.body)
			require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
			require.False(t, got.Parsing.Streamed)
			var resp struct {
				Choices []struct {
					Message      json.RawMessage `json:"message"`
					FinishReason string          `json:"finish_reason"`
				} `json:"choices"`
			}
			require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &resp))
			require.JSONEq(t, tt.want, string(resp.Choices[0].Message))
			require.Equal(t, tt.finish, resp.Choices[0].FinishReason)
			var sdk openai.ChatCompletion
			require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &sdk))
			for _, tc := range sdk.Choices[0].Message.ToolCalls {
				require.True(t, json.Valid([]byte(tc.Function.Arguments)))
			}
		})
	}
}

// textDeltas splits text into deltas of size bytes; the last carries finish.
func textDeltas(text string, size int, finish string) []llm.Delta {
	var ds []llm.Delta
	for i := 0; i < len(text); i += size {
		ds = append(ds, llm.Delta{Text: text[i:min(i+size, len(text))], TokenIDs: []int32{1}})
	}
	ds = append(ds, llm.Delta{FinishReason: finish})
	return ds
}

// TestForcedToolCallsHTTP runs forced tool choices through the handler: the backend's JSON
// output becomes tool calls, streamed (as the SDK accumulates them) and not.
func TestForcedToolCallsHTTP(t *testing.T) {
	t.Parallel()
	required := `[{"name": "get_weather", "parameters": {"city": "Pa}ris\"", "n": [1, {"x": null}]}}, {"parameters": {}, "name": "get_time"}]`
	named := `{"city": "Paris \\u00e9"}`
	tests := []struct {
		name    string
		choice  string
		text    string
		finish  string
		calls   [][2]string // name, arguments
		content string      // the content when the output is not complete calls
		reason  string
	}{
		{name: "required", choice: `"required"`, text: required, finish: "stop", reason: "tool_calls",
			calls: [][2]string{{"get_weather", `{"city": "Pa}ris\"", "n": [1, {"x": null}]}`}, {"get_time", `{}`}}},
		{name: "named", choice: `{"type":"function","function":{"name":"get_weather"}}`, text: named, finish: "stop", reason: "tool_calls",
			calls: [][2]string{{"get_weather", named}}},
		{name: "named cut by max_tokens", choice: `{"type":"function","function":{"name":"get_weather"}}`, text: `{"city": "Par`, finish: "length", reason: "length",
			content: `{"city": "Par`},
		{name: "required cut by max_tokens", choice: `"required"`, text: required[:60], finish: "length", reason: "length",
			content: required[:60]},
	}
	for _, tt := range tests {
		for _, size := range []int{1, 3, 1000} {
			t.Run(tt.name, func(t *testing.T) {
				t.Parallel()
				body := `{` + userHi + `,` + twoTools + `,"tool_choice":` + tt.choice
				// Not streamed.
				var got llm.Request
				s := newTestServer(t, recordingBackend(soInfo, &got, textDeltas(tt.text, size, tt.finish)...))
				rec := do(s, http.MethodPost, "/v1/chat/completions", body+`}`)
				require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
				require.Nil(t, got.Parsing, "forced calls need no parser")
				var resp openai.ChatCompletion
				require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &resp))
				ch := resp.Choices[0]
				require.Equal(t, tt.reason, ch.FinishReason)
				require.Equal(t, tt.content, ch.Message.Content)
				require.Len(t, ch.Message.ToolCalls, len(tt.calls))
				for i, c := range tt.calls {
					tc := ch.Message.ToolCalls[i]
					require.Equal(t, "chatcmpl-tool-test", tc.ID)
					require.Equal(t, c[0], tc.Function.Name)
					require.Equal(t, c[1], tc.Function.Arguments)
				}
				if tt.calls != nil {
					require.Contains(t, rec.Body.String(), `"content":null`)
				}

				// Streamed, accumulated by the SDK.
				s = newTestServer(t, recordingBackend(soInfo, nil, textDeltas(tt.text, size, tt.finish)...))
				acc := sdkStream(t, s, body+`,"stream":true}`)
				sch := acc.Choices[0]
				require.Equal(t, tt.reason, sch.FinishReason)
				if tt.calls == nil {
					// Cut short, streamed: the pieces sent stay (their arguments are the text
					// so far), the rest is content, and the finish reason says it was cut.
					require.NotEmpty(t, sch.Message.Content+func() string {
						if len(sch.Message.ToolCalls) == 0 {
							return ""
						}
						return sch.Message.ToolCalls[0].Function.Arguments
					}())
					for _, tc := range sch.Message.ToolCalls {
						require.Contains(t, tt.text, tc.Function.Arguments)
					}
					require.True(t, strings.HasSuffix(tt.text, sch.Message.Content))
					return
				}
				require.Empty(t, sch.Message.Content)
				require.Len(t, sch.Message.ToolCalls, len(tt.calls))
				for i, c := range tt.calls {
					tc := sch.Message.ToolCalls[i]
					require.Equal(t, "chatcmpl-tool-test", tc.ID)
					require.Equal(t, "function", string(tc.Type))
					require.Equal(t, c[0], tc.Function.Name)
					require.Equal(t, c[1], tc.Function.Arguments)
				}
			})
		}
	}
}
