package server

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/llm"
)

// toolInfo is a served model with a tool-call parser and structured outputs.
var toolInfo = func() llm.ModelInfo {
	m := testInfo
	m.ToolCallParser, m.StructuredOutputs = "hermes", true
	return m
}()

const responsesWeatherTool = `{"type":"function","name":"get_weather","description":"Weather of a city",` +
	`"parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}`

func TestResponsesBadRequest(t *testing.T) {
	t.Parallel()
	plain := llm.ModelInfo{ID: testModel, MaxModelLen: 2048, Backend: "plain"}
	tests := []struct {
		name  string
		info  *llm.ModelInfo // default toolInfo
		body  string
		param string
		msg   string
	}{
		{"no input", nil, `{"model":"test-model"}`, "input", "required"},
		{"empty input", nil, `{"input":""}`, "input", "empty"},
		{"empty items", nil, `{"input":[]}`, "input", "empty"},
		{"input number", nil, `{"input":3}`, "input", "string or an array"},
		{"item not object", nil, `{"input":["hi"]}`, "input[0]", "input item"},
		{"item type", nil, `{"input":[{"type":"item_reference","id":"x"}]}`, "input[0].type", "item_reference"},
		{"role", nil, `{"input":[{"role":"tool","content":"x"}]}`, "input[0].role", "tool"},
		{"image", nil, `{"input":[{"role":"user","content":[{"type":"input_image","image_url":"http://x"}]}]}`, "input[0].content[0].type", "input_image"},
		{"file", nil, `{"input":[{"role":"user","content":[{"type":"input_file","file_id":"f"}]}]}`, "input[0].content[0].type", "input_file"},
		{"part text", nil, `{"input":[{"role":"user","content":[{"type":"input_text"}]}]}`, "input[0].content[0].text", "required"},
		{"call without id", nil, `{"input":[{"type":"function_call","name":"f","arguments":"{}"}]}`, "input[0].call_id", "required"},
		{"call bad args", nil, `{"input":[{"type":"function_call","call_id":"c","name":"f","arguments":"{"}]}`, "input[0].arguments", "JSON"},
		{"output without id", nil, `{"input":[{"type":"function_call_output","output":"x"}]}`, "input[0].call_id", "required"},
		{"only reasoning", nil, `{"input":[{"type":"reasoning","summary":[]}]}`, "input", "no message"},
		{"wrong type", nil, `{"input":"hi","temperature":"hot"}`, "temperature", "number"},
		{"wrong type max", nil, `{"input":"hi","max_output_tokens":1.5}`, "max_output_tokens", "integer"},
		{"unknown field", nil, `{"input":"hi","frobnicate":1}`, "frobnicate", "not supported"},
		{"store", nil, `{"input":"hi","store":true}`, "store", "keeps no responses"},
		{"previous", nil, `{"input":"hi","previous_response_id":"resp_1"}`, "previous_response_id", "keeps no responses"},
		{"background", nil, `{"input":"hi","background":true}`, "background", "Background"},
		{"conversation", nil, `{"input":"hi","conversation":"conv_1"}`, "conversation", "conversation"},
		{"prompt", nil, `{"input":"hi","prompt":{"id":"p"}}`, "prompt", "templates"},
		{"include", nil, `{"input":"hi","include":["message.output_text.logprobs"]}`, "include", "logprobs"},
		{"top_logprobs", nil, `{"input":"hi","top_logprobs":2}`, "top_logprobs", "not supported"},
		{"truncation", nil, `{"input":"hi","truncation":"auto"}`, "truncation", "auto"},
		{"n", nil, `{"input":"hi","n":2}`, "n", "one output"},
		{"max_tool_calls", nil, `{"input":"hi","max_tool_calls":1}`, "max_tool_calls", "not supported"},
		{"effort", nil, `{"input":"hi","reasoning":{"effort":"high"}}`, "reasoning.effort", "not supported"},
		{"verbosity", nil, `{"input":"hi","text":{"verbosity":"low"}}`, "text.verbosity", "not supported"},
		{"obfuscation", nil, `{"input":"hi","stream":true,"stream_options":{"include_obfuscation":true}}`, "stream_options.include_obfuscation", "false"},
		{"stream options unstreamed", nil, `{"input":"hi","stream_options":{}}`, "stream_options", "stream"},
		{"max_output_tokens 0", nil, `{"input":"hi","max_output_tokens":0}`, "max_output_tokens", "at least 1"},
		{"max_output_tokens big", nil, `{"input":"hi","max_output_tokens":4096}`, "max_output_tokens", "max_model_len"},
		{"temperature", nil, `{"input":"hi","temperature":3}`, "temperature", "[0, 2]"},
		{"top_p", nil, `{"input":"hi","top_p":0}`, "top_p", "(0, 1]"},
		{"format type", nil, `{"input":"hi","text":{"format":{"type":"grammar"}}}`, "text.format.type", "grammar"},
		{"format no name", nil, `{"input":"hi","text":{"format":{"type":"json_schema","schema":{}}}}`, "text.format.name", "required"},
		{"format no schema", nil, `{"input":"hi","text":{"format":{"type":"json_schema","name":"x"}}}`, "text.format.schema", "required"},
		{"format schema type", nil, `{"input":"hi","text":{"format":{"type":"json_schema","name":"x","schema":[]}}}`, "text.format.schema", "object"},
		{"format unsupported backend", &plain, `{"input":"hi","text":{"format":{"type":"json_object"}}}`, "text.format", "structured outputs"},
		{"hosted tool", nil, `{"input":"hi","tools":[{"type":"web_search"}]}`, "tools[0].type", "web_search"},
		{"tool name", nil, `{"input":"hi","tools":[{"type":"function","name":"a b"}]}`, "tools[0].name", "letters"},
		{"tool params", nil, `{"input":"hi","tools":[{"type":"function","name":"f","parameters":[]}]}`, "tools[0].parameters", "JSON object"},
		{"tool choice type", nil, `{"input":"hi","tools":[` + responsesWeatherTool + `],"tool_choice":{"type":"file_search"}}`, "tool_choice.type", "file_search"},
		{"tool choice unknown", nil, `{"input":"hi","tools":[` + responsesWeatherTool + `],"tool_choice":{"type":"function","name":"nope"}}`, "tool_choice", "nope"},
		{"tool choice without tools", nil, `{"input":"hi","tool_choice":"required"}`, "tool_choice", "tools"},
		{"auto without parser", &plain, `{"input":"hi","tools":[` + responsesWeatherTool + `]}`, "tool_choice", "parser"},
		{"forced and format", nil, `{"input":"hi","tools":[` + responsesWeatherTool + `],"tool_choice":"required","text":{"format":{"type":"json_object"}}}`, "text.format", "both constrain"},
		{"model", nil, `{"model":"other","input":"hi"}`, "model", "does not exist"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := backendWith(scripted(llm.Usage{}, nil, llm.Delta{FinishReason: "stop"}), nil)
			b.info = toolInfo
			if tt.info != nil {
				b.info = *tt.info
			}
			called := false
			gen := b.generateFn
			b.generateFn = func(ctx context.Context, req llm.Request) (llm.TokenStream, error) {
				called = true
				return gen(ctx, req)
			}
			s := newTestServer(t, b)
			rec := do(s, http.MethodPost, "/v1/responses", tt.body)
			status := http.StatusBadRequest
			typ := "BadRequestError"
			if tt.param == "model" {
				status, typ = http.StatusNotFound, "NotFoundError"
			}
			msg := requireError(t, rec, status, typ, tt.param)
			require.Contains(t, msg, tt.msg)
			require.False(t, called, "a refused request reached the backend")
		})
	}
}

// decodeResponse decodes a non-streamed response body.
func decodeResponse(t *testing.T, rec *httptest.ResponseRecorder) map[string]any {
	t.Helper()
	require.Equal(t, http.StatusOK, rec.Code, "body: %s", rec.Body)
	var out map[string]any
	require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &out))
	return out
}

func TestResponsesRequest(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		body  string
		check func(t *testing.T, req llm.Request)
	}{
		{"string input and instructions", `{"input":"hi","instructions":"be brief","max_output_tokens":7,"temperature":0,"top_p":0.5}`,
			func(t *testing.T, req llm.Request) {
				require.Equal(t, []llm.Message{{Role: "system", Content: "be brief"}, {Role: "user", Content: "hi"}}, req.Messages)
				require.Equal(t, 7, req.Sampling.MaxTokens)
				require.Equal(t, 0.0, *req.Sampling.Temperature)
				require.Equal(t, 0.5, *req.Sampling.TopP)
				require.Nil(t, req.Sampling.StructuredOutputs)
				require.Equal(t, "resp_test", req.ID)
			}},
		{"items with a tool round trip", `{"input":[` +
			`{"role":"developer","content":"sys"},` +
			`{"type":"message","role":"user","content":[{"type":"input_text","text":"a"},{"type":"input_text","text":"b"}]},` +
			`{"type":"reasoning","id":"rs_1","summary":[]},` +
			`{"type":"message","role":"assistant","content":[{"type":"output_text","text":"let me see","annotations":[]}]},` +
			`{"type":"function_call","call_id":"c1","name":"get_weather","arguments":"{\"city\":\"Paris\"}"},` +
			`{"type":"function_call","call_id":"c2","name":"get_weather","arguments":"{\"city\":\"Rome\"}"},` +
			`{"type":"function_call_output","call_id":"c1","output":"sunny"},` +
			`{"type":"function_call_output","call_id":"c2","output":[{"type":"input_text","text":"rain"}]}],` +
			`"tools":[` + responsesWeatherTool + `],"tool_choice":"none"}`,
			func(t *testing.T, req llm.Request) {
				call := func(id, city string) llm.ToolCall {
					return llm.ToolCall{ID: id, Type: "function", Function: llm.FunctionCall{Name: "get_weather", Arguments: `{"city":"` + city + `"}`}}
				}
				require.Equal(t, []llm.Message{
					{Role: "system", Content: "sys"},
					{Role: "user", Content: "a\nb"},
					{Role: "assistant", Content: "let me see", ToolCalls: []llm.ToolCall{call("c1", "Paris"), call("c2", "Rome")}},
					{Role: "tool", Content: "sunny", ToolCallID: "c1", Name: "get_weather"},
					{Role: "tool", Content: "rain", ToolCallID: "c2", Name: "get_weather"},
				}, req.Messages)
				require.JSONEq(t, `[{"type":"function","function":{"name":"get_weather","description":"Weather of a city",`+
					`"parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}]`, string(req.Tools))
				require.Nil(t, req.Parsing)
			}},
		{"json_schema", `{"input":"hi","text":{"format":{"type":"json_schema","name":"x","strict":true,"schema":{"type":"object", "properties":{}}}}}`,
			func(t *testing.T, req llm.Request) {
				require.Equal(t, &llm.StructuredOutputs{JSON: json.RawMessage(`{"type":"object","properties":{}}`), Param: "text.format"}, req.Sampling.StructuredOutputs)
			}},
		{"json_object", `{"input":"hi","text":{"format":{"type":"json_object"}}}`,
			func(t *testing.T, req llm.Request) {
				require.Equal(t, &llm.StructuredOutputs{JSONObject: true, Param: "text.format"}, req.Sampling.StructuredOutputs)
			}},
		{"auto tools parse", `{"input":"hi","tools":[` + responsesWeatherTool + `],"stream":true}`,
			func(t *testing.T, req llm.Request) {
				require.Equal(t, &llm.Parsing{ToolCalls: true, Streamed: true}, req.Parsing)
			}},
		{"named tool forced", `{"input":"hi","tools":[` + responsesWeatherTool + `],"tool_choice":{"type":"function","name":"get_weather"}}`,
			func(t *testing.T, req llm.Request) {
				so := req.Sampling.StructuredOutputs
				require.NotNil(t, so)
				require.Equal(t, "tool_choice", so.Param)
				require.JSONEq(t, `{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}`, string(so.JSON))
			}},
		{"accepted no-ops", `{"input":"hi","store":false,"background":false,"include":[],"truncation":"disabled","service_tier":"auto","user":"u","metadata":{"k":"v"},"reasoning":{"effort":null},"top_logprobs":0}`,
			func(t *testing.T, req llm.Request) {
				require.Len(t, req.Messages, 1)
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var got llm.Request
			b := backendWith(scripted(llm.Usage{}, nil, llm.Delta{Text: "x", FinishReason: "stop"}), &got)
			b.info = toolInfo
			s := newTestServer(t, b)
			rec := do(s, http.MethodPost, "/v1/responses", tt.body)
			require.Equal(t, http.StatusOK, rec.Code, "body: %s", rec.Body)
			tt.check(t, got)
		})
	}
}

func TestResponsesObject(t *testing.T) {
	t.Parallel()
	u := llm.Usage{PromptTokens: 5, CompletionTokens: 3}
	tests := []struct {
		name   string
		body   string
		deltas []llm.Delta
		want   string // the response's output, status and incomplete_details
	}{
		{"text", `{"input":"hi"}`,
			[]llm.Delta{{Text: "Hel", TokenIDs: []int32{1}}, {Text: "lo", TokenIDs: []int32{2}, FinishReason: "stop"}},
			`{"status":"completed","incomplete_details":null,"output":[{"type":"message","id":"msg_test","status":"completed","role":"assistant",` +
				`"content":[{"type":"output_text","text":"Hello","annotations":[],"logprobs":[]}]}]}`},
		{"length", `{"input":"hi","max_output_tokens":2}`,
			[]llm.Delta{{Text: "Hel", TokenIDs: []int32{1}}, {Text: "lo", TokenIDs: []int32{2}, FinishReason: "length"}},
			`{"status":"incomplete","incomplete_details":{"reason":"max_output_tokens"},"output":[{"type":"message","id":"msg_test","status":"incomplete","role":"assistant",` +
				`"content":[{"type":"output_text","text":"Hello","annotations":[],"logprobs":[]}]}]}`},
		{"auto tool call", `{"input":"hi","tools":[` + responsesWeatherTool + `]}`,
			[]llm.Delta{{ToolCalls: []llm.ToolCallDelta{{Index: 0, ID: "call_1", Type: "function", Name: "get_weather", Arguments: `{"city":`}}},
				{ToolCalls: []llm.ToolCallDelta{{Index: 0, Arguments: `"Paris"}`}}, FinishReason: "tool_calls"}},
			`{"status":"completed","incomplete_details":null,"output":[{"type":"function_call","id":"fc_test","status":"completed",` +
				`"call_id":"call_1","name":"get_weather","arguments":"{\"city\":\"Paris\"}"}]}`},
		{"forced tool call", `{"input":"hi","tools":[` + responsesWeatherTool + `],"tool_choice":"required"}`,
			[]llm.Delta{{Text: `[{"name":"get_weather","parameters":{"city":"Rome"}}]`, FinishReason: "stop"}},
			`{"status":"completed","incomplete_details":null,"output":[{"type":"function_call","id":"fc_test","status":"completed",` +
				`"call_id":"chatcmpl-tool-test","name":"get_weather","arguments":"{\"city\":\"Rome\"}"}]}`},
		{"reasoning", `{"input":"hi"}`,
			[]llm.Delta{{Reasoning: "think", FinishReason: ""}, {Text: "ok", FinishReason: "stop"}},
			`{"status":"completed","incomplete_details":null,"output":[{"type":"reasoning","id":"rs_test","status":"completed","summary":[],` +
				`"content":[{"type":"reasoning_text","text":"think"}]},{"type":"message","id":"msg_test","status":"completed","role":"assistant",` +
				`"content":[{"type":"output_text","text":"ok","annotations":[],"logprobs":[]}]}]}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := backendWith(scripted(u, nil, tt.deltas...), nil)
			b.info = toolInfo
			s := newTestServer(t, b)
			out := decodeResponse(t, do(s, http.MethodPost, "/v1/responses", tt.body))
			got, err := json.Marshal(map[string]any{"status": out["status"], "incomplete_details": out["incomplete_details"], "output": out["output"]})
			require.NoError(t, err)
			require.JSONEq(t, tt.want, string(got))
			require.Equal(t, "resp_test", out["id"])
			require.Equal(t, "response", out["object"])
			require.Equal(t, float64(testCreated), out["created_at"])
			require.Equal(t, testModel, out["model"])
			require.Equal(t, false, out["store"])
			usage, _ := json.Marshal(out["usage"])
			require.JSONEq(t, `{"input_tokens":5,"input_tokens_details":{"cached_tokens":0,"cache_write_tokens":0},"output_tokens":3,`+
				`"output_tokens_details":{"reasoning_tokens":0},"total_tokens":8}`, string(usage))
		})
	}
}

func TestResponsesEcho(t *testing.T) {
	t.Parallel()
	b := backendWith(scripted(llm.Usage{}, nil, llm.Delta{Text: "x", FinishReason: "stop"}), nil)
	b.info = toolInfo
	s := newTestServer(t, b)
	out := decodeResponse(t, do(s, http.MethodPost, "/v1/responses", `{"input":"hi","instructions":"be brief","temperature":0.5,"top_p":0.9,`+
		`"max_output_tokens":9,"tools":[`+responsesWeatherTool+`],"tool_choice":"none","parallel_tool_calls":false,"metadata":{"k":"v"},`+
		`"text":{"format":{"type":"json_object"}},"user":"me"}`))
	for k, v := range map[string]any{
		"instructions": "be brief", "temperature": 0.5, "top_p": 0.9, "max_output_tokens": 9.0, "tool_choice": "none",
		"parallel_tool_calls": false, "metadata": map[string]any{"k": "v"}, "text": map[string]any{"format": map[string]any{"type": "json_object"}},
		"user": "me", "store": false, "background": false, "truncation": "disabled", "previous_response_id": nil, "error": nil,
	} {
		require.Equal(t, v, out[k], k)
	}
	tools, _ := json.Marshal(out["tools"])
	require.JSONEq(t, `[`+responsesWeatherTool+`]`, string(tools))
}

// sseEvent is one parsed event of a stream.
type sseEvent struct {
	name string
	data map[string]any
}

// parseEvents splits a Responses stream into its events, checking that each names its type.
func parseEvents(t *testing.T, body string) []sseEvent {
	t.Helper()
	var out []sseEvent
	for _, block := range strings.Split(strings.TrimSuffix(body, "\n\n"), "\n\n") {
		lines := strings.Split(block, "\n")
		require.Len(t, lines, 2, "event %q", block)
		name, ok := strings.CutPrefix(lines[0], "event: ")
		require.True(t, ok, "event line %q", lines[0])
		data, ok := strings.CutPrefix(lines[1], "data: ")
		require.True(t, ok, "data line %q", lines[1])
		var m map[string]any
		require.NoError(t, json.Unmarshal([]byte(data), &m))
		require.Equal(t, name, m["type"])
		out = append(out, sseEvent{name, m})
	}
	return out
}

func TestResponsesStream(t *testing.T) {
	t.Parallel()
	u := llm.Usage{PromptTokens: 4, CompletionTokens: 2}
	tests := []struct {
		name   string
		body   string
		deltas []llm.Delta
		names  []string
		final  string // the output of the last event's response
		last   string
	}{
		{"text", `{"input":"hi","stream":true}`,
			[]llm.Delta{{TokenIDs: []int32{9}}, {Text: "Hel", TokenIDs: []int32{1}}, {Text: "lo", TokenIDs: []int32{2}, FinishReason: "stop"}},
			[]string{"response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
				"response.output_text.delta", "response.output_text.delta", "response.output_text.done", "response.content_part.done",
				"response.output_item.done", "response.completed"},
			`[{"type":"message","id":"msg_test","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hello","annotations":[],"logprobs":[]}]}]`,
			"response.completed"},
		{"length", `{"input":"hi","stream":true,"max_output_tokens":1}`,
			[]llm.Delta{{Text: "Hel", TokenIDs: []int32{1}, FinishReason: "length"}},
			[]string{"response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
				"response.output_text.delta", "response.output_text.done", "response.content_part.done",
				"response.output_item.done", "response.incomplete"},
			`[{"type":"message","id":"msg_test","status":"incomplete","role":"assistant","content":[{"type":"output_text","text":"Hel","annotations":[],"logprobs":[]}]}]`,
			"response.incomplete"},
		{"empty", `{"input":"hi","stream":true}`,
			[]llm.Delta{{TokenIDs: []int32{1}, FinishReason: "stop"}},
			[]string{"response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
				"response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"},
			`[{"type":"message","id":"msg_test","status":"completed","role":"assistant","content":[{"type":"output_text","text":"","annotations":[],"logprobs":[]}]}]`,
			"response.completed"},
		{"reasoning, text and an auto tool call", `{"input":"hi","stream":true,"tools":[` + responsesWeatherTool + `]}`,
			[]llm.Delta{{Reasoning: "hmm"}, {Text: "ok"},
				{ToolCalls: []llm.ToolCallDelta{{Index: 0, ID: "call_1", Type: "function", Name: "get_weather"}}},
				{ToolCalls: []llm.ToolCallDelta{{Index: 0, Arguments: `{"city":"Oslo"}`}}, FinishReason: "tool_calls"}},
			[]string{"response.created", "response.in_progress",
				"response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
				"response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
				"response.output_item.added", "response.content_part.added", "response.output_text.delta",
				"response.output_text.done", "response.content_part.done", "response.output_item.done",
				"response.output_item.added", "response.function_call_arguments.delta",
				"response.function_call_arguments.done", "response.output_item.done", "response.completed"},
			`[{"type":"reasoning","id":"rs_test","status":"completed","summary":[],"content":[{"type":"reasoning_text","text":"hmm"}]},` +
				`{"type":"message","id":"msg_test","status":"completed","role":"assistant","content":[{"type":"output_text","text":"ok","annotations":[],"logprobs":[]}]},` +
				`{"type":"function_call","id":"fc_test","status":"completed","call_id":"call_1","name":"get_weather","arguments":"{\"city\":\"Oslo\"}"}]`,
			"response.completed"},
		{"forced named call split anywhere", `{"input":"hi","stream":true,"tools":[` + responsesWeatherTool + `],"tool_choice":{"type":"function","name":"get_weather"}}`,
			[]llm.Delta{{Text: `{"ci`}, {Text: `ty": "Li`}, {Text: `ma"}`, FinishReason: "stop"}},
			nil,
			`[{"type":"function_call","id":"fc_test","status":"completed","call_id":"chatcmpl-tool-test","name":"get_weather","arguments":"{\"city\": \"Lima\"}"}]`,
			"response.completed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := backendWith(scripted(u, nil, tt.deltas...), nil)
			b.info = toolInfo
			s := newTestServer(t, b)
			rec := do(s, http.MethodPost, "/v1/responses", tt.body)
			require.Equal(t, http.StatusOK, rec.Code, "body: %s", rec.Body)
			require.Equal(t, "text/event-stream", rec.Header().Get("Content-Type"))
			events := parseEvents(t, rec.Body.String())
			var names []string
			for i, e := range events {
				names = append(names, e.name)
				require.Equal(t, float64(i), e.data["sequence_number"], "event %d %s", i, e.name)
			}
			if tt.names != nil {
				require.Equal(t, tt.names, names)
			}
			first := events[0].data["response"].(map[string]any)
			require.Equal(t, "in_progress", first["status"])
			require.Equal(t, []any{}, first["output"])
			last := events[len(events)-1]
			require.Equal(t, tt.last, last.name)
			resp := last.data["response"].(map[string]any)
			got, _ := json.Marshal(resp["output"])
			require.JSONEq(t, tt.final, string(got))
			usage := resp["usage"].(map[string]any)
			require.Equal(t, 6.0, usage["total_tokens"])

			// The deltas accumulate to the items' final text, as the SDKs' helpers do.
			var text, args strings.Builder
			for _, e := range events {
				switch e.name {
				case "response.output_text.delta":
					text.WriteString(e.data["delta"].(string))
				case "response.function_call_arguments.delta":
					args.WriteString(e.data["delta"].(string))
				}
			}
			for _, it := range resp["output"].([]any) {
				item := it.(map[string]any)
				switch item["type"] {
				case "message":
					require.Equal(t, item["content"].([]any)[0].(map[string]any)["text"], text.String())
				case "function_call":
					require.Equal(t, item["arguments"], args.String())
				}
			}
		})
	}
}

func TestResponsesStreamRefusedBeforeOutput(t *testing.T) {
	t.Parallel()
	tooLong := &llm.RequestError{Status: 400, Type: "BadRequestError", Param: "input", Message: "The input is too long for the model."}
	s := newTestServer(t, backendWith(scripted(llm.Usage{}, tooLong), nil))
	rec := do(s, http.MethodPost, "/v1/responses", `{"input":"hi","stream":true}`)
	require.Contains(t, requireError(t, rec, http.StatusBadRequest, "BadRequestError", "input"), "too long")
}

func TestResponsesStreamFailsAfterOutput(t *testing.T) {
	t.Parallel()
	s := newTestServer(t, backendWith(scripted(llm.Usage{}, llm.ErrEngineDead, llm.Delta{Text: "a"}), nil))
	rec := do(s, http.MethodPost, "/v1/responses", `{"input":"hi","stream":true}`)
	require.Equal(t, http.StatusOK, rec.Code)
	events := parseEvents(t, rec.Body.String())
	require.Equal(t, "error", events[len(events)-2].name)
	last := events[len(events)-1]
	require.Equal(t, "response.failed", last.name)
	require.Equal(t, "failed", last.data["response"].(map[string]any)["status"])
}

func TestResponsesClientDisconnect(t *testing.T) {
	for _, streaming := range []bool{true, false} {
		t.Run(map[bool]string{true: "stream", false: "whole"}[streaming], func(t *testing.T) {
			var stream *fakeStream
			sawCancel := make(chan error, 1)
			blocked := make(chan struct{})
			s := newTestServer(t, blockingBackend([]llm.Delta{{Index: 0, Text: "first"}}, &stream, blocked, sawCancel))
			returned := make(chan struct{})
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				defer close(returned)
				s.ServeHTTP(w, r)
			}))
			defer srv.Close()

			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			body := `{"input":"hi","stream":` + map[bool]string{true: "true", false: "false"}[streaming] + `}`
			req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/v1/responses", strings.NewReader(body))
			require.NoError(t, err)
			if streaming {
				resp, err := srv.Client().Do(req)
				require.NoError(t, err)
				defer resp.Body.Close()
				br := bufio.NewReader(resp.Body)
				for {
					line, err := br.ReadString('\n')
					require.NoError(t, err)
					if strings.Contains(line, `"delta":"first"`) {
						break
					}
				}
				cancel()
			} else {
				errc := make(chan error, 1)
				go func() {
					resp, err := srv.Client().Do(req)
					if err == nil {
						resp.Body.Close()
					}
					errc <- err
				}()
				<-blocked
				cancel()
				require.ErrorIs(t, <-errc, context.Canceled)
			}
			select {
			case err := <-sawCancel:
				require.ErrorIs(t, err, context.Canceled)
			case <-time.After(10 * time.Second):
				t.Fatal("the stream never saw the request context cancelled")
			}
			select {
			case <-returned:
			case <-time.After(10 * time.Second):
				t.Fatal("the handler did not return")
			}
			require.True(t, stream.isClosed(), "stream not closed")
		})
	}
}

func TestResponsesServerAbort(t *testing.T) {
	var stream *fakeStream
	sawCancel := make(chan error, 1)
	blocked := make(chan struct{})
	s := newTestServer(t, blockingBackend([]llm.Delta{{Index: 0, Text: "partial"}}, &stream, blocked, sawCancel))
	done := make(chan *httptest.ResponseRecorder)
	go func() { done <- do(s, http.MethodPost, "/v1/responses", `{"input":"hi","stream":true}`) }()
	<-blocked
	s.AbortRequests()
	rec := <-done
	<-sawCancel
	events := parseEvents(t, rec.Body.String())
	last := events[len(events)-1]
	require.Equal(t, "response.incomplete", last.name)
	resp := last.data["response"].(map[string]any)
	require.Equal(t, "incomplete", resp["status"])
	got, _ := json.Marshal(resp["output"])
	require.JSONEq(t, `[{"type":"message","id":"msg_test","status":"incomplete","role":"assistant","content":[{"type":"output_text","text":"partial","annotations":[],"logprobs":[]}]}]`, string(got))
}

// FuzzDecodeResponses feeds arbitrary bodies through POST /v1/responses: none may panic, get a
// 5xx or reach the backend invalid; a stream ends with its terminal event.
func FuzzDecodeResponses(f *testing.F) {
	fuzzSeeds(f,
		`{"input":"hi"}`,
		`{"input":"hi","stream":true,"instructions":"x","max_output_tokens":4,"temperature":0.5,"top_p":0.9}`,
		`{"input":[{"role":"user","content":[{"type":"input_text","text":"a"}]},{"type":"function_call","call_id":"c","name":"f","arguments":"{}"},{"type":"function_call_output","call_id":"c","output":"r"}],"tools":[{"type":"function","name":"f"}],"tool_choice":"required","stream":true}`,
		`{"input":"w","tools":[{"type":"function","name":"f","parameters":{"type":"object"}}],"tool_choice":{"type":"function","name":"f"},"parallel_tool_calls":false}`,
		`{"input":"w","text":{"format":{"type":"json_schema","name":"n","schema":{"type":"object"}}},"stream":true}`,
		`{"input":"w","store":true}`, `{"input":[]}`, `{"input":[{"type":"reasoning"}]}`, `{"input":`, `[]`, `null`,
		"{\"input\":\"\xff\"}",
	)
	f.Fuzz(func(t *testing.T, body []byte) {
		s := fuzzServer(t)
		rec := httptest.NewRecorder()
		s.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/v1/responses", strings.NewReader(string(body))))
		if rec.Code == http.StatusOK && rec.Header().Get("Content-Type") == "text/event-stream" {
			events := parseEvents(t, rec.Body.String())
			last := events[len(events)-1].name
			require.Contains(t, []string{"response.completed", "response.incomplete"}, last)
			return
		}
		checkAnswer(t, rec)
	})
}
