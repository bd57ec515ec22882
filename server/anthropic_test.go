package server

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/llm"
)

const anthropicHello = `{"model":"test-model","max_tokens":16,"messages":[{"role":"user","content":"Hi"}]`

// requireAnthropicError checks that rec holds an Anthropic error of the given status and type
// whose message names want, and returns the message.
func requireAnthropicError(t *testing.T, rec *httptest.ResponseRecorder, status int, typ, want string) string {
	t.Helper()
	require.Equal(t, status, rec.Code, "body: %s", rec.Body)
	require.Equal(t, "application/json", rec.Header().Get("Content-Type"))
	var e struct {
		Type  string `json:"type"`
		Error struct {
			Type    string `json:"type"`
			Message string `json:"message"`
		} `json:"error"`
	}
	require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &e), "body: %s", rec.Body)
	require.Equal(t, "error", e.Type)
	require.Equal(t, typ, e.Error.Type)
	require.Contains(t, e.Error.Message, want)
	return e.Error.Message
}

func TestAnthropicBadRequests(t *testing.T) {
	info := testInfo
	info.StructuredOutputs = true
	b := &fakeBackend{info: info, generateFn: func(context.Context, llm.Request) (llm.TokenStream, error) {
		return scripted(llm.Usage{PromptTokens: 3, CompletionTokens: 1}, nil, llm.Delta{Text: "ok", FinishReason: "stop"}), nil
	}}
	s := newTestServer(t, b)
	tool := `{"name":"get_weather","input_schema":{"type":"object","properties":{"city":{"type":"string"}}}}`
	msgs := `"messages":[{"role":"user","content":"Hi"}]`
	for _, tc := range []struct {
		name, body   string
		status       int
		typ, mention string
	}{
		{"not an object", `[1]`, 400, "invalid_request_error", ""},
		{"malformed", `{"model":`, 400, "invalid_request_error", "Malformed"},
		{"no model", `{"max_tokens":5,` + msgs + `}`, 400, "invalid_request_error", "model"},
		{"unknown model", `{"model":"other","max_tokens":5,` + msgs + `}`, 404, "not_found_error", "other"},
		{"no max_tokens", `{"model":"test-model",` + msgs + `}`, 400, "invalid_request_error", "max_tokens"},
		{"max_tokens 0", `{"model":"test-model","max_tokens":0,` + msgs + `}`, 400, "invalid_request_error", "max_tokens"},
		{"max_tokens beyond the context", `{"model":"test-model","max_tokens":99999,` + msgs + `}`, 400, "invalid_request_error", "max_tokens"},
		{"max_tokens a string", `{"model":"test-model","max_tokens":"5",` + msgs + `}`, 400, "invalid_request_error", "max_tokens"},
		{"no messages", `{"model":"test-model","max_tokens":5,"messages":[]}`, 400, "invalid_request_error", "messages"},
		{"system role", `{"model":"test-model","max_tokens":5,"messages":[{"role":"system","content":"x"}]}`, 400, "invalid_request_error", "messages[0].role"},
		{"empty final assistant (prefill)", `{"model":"test-model","max_tokens":5,"messages":[{"role":"user","content":"x"},{"role":"assistant","content":""}]}`, 400, "invalid_request_error", "messages[1]"},
		{"image block", `{"model":"test-model","max_tokens":5,"messages":[{"role":"user","content":[{"type":"image","source":{}}]}]}`, 400, "invalid_request_error", "messages[0].content[0].type"},
		{"document block", `{"model":"test-model","max_tokens":5,"messages":[{"role":"user","content":[{"type":"document","source":{}}]}]}`, 400, "invalid_request_error", "document"},
		{"text block without text", `{"model":"test-model","max_tokens":5,"messages":[{"role":"user","content":[{"type":"text"}]}]}`, 400, "invalid_request_error", "messages[0].content[0].text"},
		{"text block with citations", `{"model":"test-model","max_tokens":5,"messages":[{"role":"user","content":[{"type":"text","text":"a","citations":[]}]}]}`, 400, "invalid_request_error", "citations"},
		{"tool_use from the user", `{"model":"test-model","max_tokens":5,"messages":[{"role":"user","content":[{"type":"tool_use","id":"t","name":"f","input":{}}]}]}`, 400, "invalid_request_error", "messages[0].content[0]"},
		{"tool_use without input", `{"model":"test-model","max_tokens":5,"messages":[{"role":"user","content":"a"},{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"f"}]},{"role":"user","content":"b"}]}`, 400, "invalid_request_error", "messages[1].content[0].input"},
		{"tool_result without id", `{"model":"test-model","max_tokens":5,"messages":[{"role":"user","content":[{"type":"tool_result","content":"x"}]}]}`, 400, "invalid_request_error", "tool_use_id"},
		{"tool_result with an image", `{"model":"test-model","max_tokens":5,"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":[{"type":"image"}]}]}]}`, 400, "invalid_request_error", "content[0].content[0].type"},
		{"system with an image", `{"model":"test-model","max_tokens":5,"system":[{"type":"image"}],` + msgs + `}`, 400, "invalid_request_error", "system[0].type"},
		{"temperature above 1", `{"model":"test-model","max_tokens":5,"temperature":1.5,` + msgs + `}`, 400, "invalid_request_error", "temperature"},
		{"top_p 0", `{"model":"test-model","max_tokens":5,"top_p":0,` + msgs + `}`, 400, "invalid_request_error", "top_p"},
		{"top_k negative", `{"model":"test-model","max_tokens":5,"top_k":-1,` + msgs + `}`, 400, "invalid_request_error", "top_k"},
		{"empty stop sequence", `{"model":"test-model","max_tokens":5,"stop_sequences":[""],` + msgs + `}`, 400, "invalid_request_error", "stop_sequences[0]"},
		{"stop_sequences a string", `{"model":"test-model","max_tokens":5,"stop_sequences":"x",` + msgs + `}`, 400, "invalid_request_error", "stop_sequences"},
		{"thinking enabled", `{"model":"test-model","max_tokens":5,"thinking":{"type":"enabled","budget_tokens":2048},` + msgs + `}`, 400, "invalid_request_error", "thinking.budget_tokens"},
		{"thinking adaptive without a parser", `{"model":"test-model","max_tokens":5,"thinking":{"type":"adaptive"},` + msgs + `}`, 400, "invalid_request_error", "thinking"},
		{"container", `{"model":"test-model","max_tokens":5,"container":"c",` + msgs + `}`, 400, "invalid_request_error", "container"},
		{"mcp_servers", `{"model":"test-model","max_tokens":5,"mcp_servers":[],` + msgs + `}`, 400, "invalid_request_error", "mcp_servers"},
		{"output_config", `{"model":"test-model","max_tokens":5,"output_config":{},` + msgs + `}`, 400, "invalid_request_error", "output_config"},
		{"unknown field", `{"model":"test-model","max_tokens":5,"frequency_penalty":1,` + msgs + `}`, 400, "invalid_request_error", "frequency_penalty"},
		{"service_tier priority", `{"model":"test-model","max_tokens":5,"service_tier":"priority",` + msgs + `}`, 400, "invalid_request_error", "service_tier"},
		{"metadata unknown key", `{"model":"test-model","max_tokens":5,"metadata":{"x":1},` + msgs + `}`, 400, "invalid_request_error", "metadata.x"},
		{"cache_control type", `{"model":"test-model","max_tokens":5,"cache_control":{"type":"forever"},` + msgs + `}`, 400, "invalid_request_error", "cache_control.type"},
		{"server tool", `{"model":"test-model","max_tokens":5,"tools":[{"type":"web_search_20250305","name":"web_search"}],` + msgs + `}`, 400, "invalid_request_error", "tools[0].type"},
		{"tool without input_schema", `{"model":"test-model","max_tokens":5,"tools":[{"name":"f"}],` + msgs + `}`, 400, "invalid_request_error", "tools[0].input_schema"},
		{"tool bad name", `{"model":"test-model","max_tokens":5,"tools":[{"name":"a b","input_schema":{"type":"object"}}],` + msgs + `}`, 400, "invalid_request_error", "tools[0].name"},
		{"duplicate tool", `{"model":"test-model","max_tokens":5,"tools":[` + tool + `,` + tool + `],"tool_choice":{"type":"any"},` + msgs + `}`, 400, "invalid_request_error", "tools[1].name"},
		{"auto without a parser", `{"model":"test-model","max_tokens":5,"tools":[` + tool + `],` + msgs + `}`, 400, "invalid_request_error", "tool_choice"},
		{"tool_choice unknown type", `{"model":"test-model","max_tokens":5,"tools":[` + tool + `],"tool_choice":{"type":"function"},` + msgs + `}`, 400, "invalid_request_error", "tool_choice.type"},
		{"tool_choice tool without name", `{"model":"test-model","max_tokens":5,"tools":[` + tool + `],"tool_choice":{"type":"tool"},` + msgs + `}`, 400, "invalid_request_error", "tool_choice.name"},
		{"tool_choice names another tool", `{"model":"test-model","max_tokens":5,"tools":[` + tool + `],"tool_choice":{"type":"tool","name":"nope"},` + msgs + `}`, 400, "invalid_request_error", "nope"},
		{"tool_choice without tools", `{"model":"test-model","max_tokens":5,"tool_choice":{"type":"any"},` + msgs + `}`, 400, "invalid_request_error", "tool_choice"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			requireAnthropicError(t, do(s, http.MethodPost, "/v1/messages", tc.body), tc.status, tc.typ, tc.mention)
		})
	}
	// The server keeps serving.
	rec := do(s, http.MethodPost, "/v1/messages", anthropicHello+`}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
}

func TestAnthropicPrefillContinues(t *testing.T) {
	var got llm.Request
	s := newTestServer(t, backendWith(scripted(llm.Usage{}, nil, llm.Delta{Text: " Paris.", FinishReason: "stop"}), &got))
	rec := do(s, http.MethodPost, "/v1/messages", `{"model":"test-model","max_tokens":5,"messages":[`+
		`{"role":"user","content":"Capital of France?"},{"role":"assistant","content":"The capital is"}]}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	require.Equal(t, &llm.ChatOptions{ContinueFinalMessage: true}, got.Chat)
	require.Equal(t, llm.Message{Role: "assistant", Content: "The capital is"}, got.Messages[len(got.Messages)-1])
	require.Contains(t, rec.Body.String(), `"text":" Paris."`) // the continuation only, as Anthropic answers

	s = newTestServer(t, backendWith(scripted(llm.Usage{}, nil, llm.Delta{Text: "y", FinishReason: "stop"}), &got))
	rec = do(s, http.MethodPost, "/v1/messages", `{"model":"test-model","max_tokens":5,"messages":[{"role":"user","content":"x"}]}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	require.Nil(t, got.Chat)
}

func TestAnthropicRequestMapping(t *testing.T) {
	info := testInfo
	info.StructuredOutputs = true
	var got llm.Request
	s := newTestServer(t, backendWith(scripted(llm.Usage{}, nil, llm.Delta{Text: "x", FinishReason: "stop"}), &got))
	body := `{"model":"test-model","max_tokens":7,"system":[{"type":"text","text":"Be brief."},{"type":"text","text":"Be kind.","cache_control":{"type":"ephemeral"}}],
		"temperature":0.5,"top_p":0.9,"top_k":20,"stop_sequences":["END"],"metadata":{"user_id":"u1"},"service_tier":"auto",
		"messages":[
			{"role":"user","content":"What is the weather?"},
			{"role":"assistant","content":[{"type":"text","text":"Let me look."},{"type":"tool_use","id":"toolu_1","name":"get_weather","input":{"city": "Paris"}}]},
			{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":[{"type":"text","text":"sunny"}]},{"type":"tool_result","tool_use_id":"toolu_2","content":"bad","is_error":true},{"type":"text","text":"Thanks"}]}
		]}`
	rec := do(s, http.MethodPost, "/v1/messages", body)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	require.Equal(t, "msg_test", got.ID)
	require.Equal(t, []llm.Message{
		{Role: "system", Content: "Be brief.\nBe kind."},
		{Role: "user", Content: "What is the weather?"},
		{Role: "assistant", Content: "Let me look.", ToolCalls: []llm.ToolCall{{ID: "toolu_1", Type: "function",
			Function: llm.FunctionCall{Name: "get_weather", Arguments: `{"city":"Paris"}`}}}},
		{Role: "tool", Content: "sunny", ToolCallID: "toolu_1"},
		{Role: "tool", Content: "Error: bad", ToolCallID: "toolu_2"},
		{Role: "user", Content: "Thanks"},
	}, got.Messages)
	require.Equal(t, llm.SamplingParams{MaxTokens: 7, Temperature: llm.Ptr(0.5), TopP: llm.Ptr(0.9), TopK: llm.Ptr(20),
		Stop: []string{"END"}, IncludeStopStrInOutput: true}, got.Sampling)
	require.Nil(t, got.Tools)
	require.Nil(t, got.Parsing)
}

func TestAnthropicNonStream(t *testing.T) {
	s := newTestServer(t, backendWith(scripted(llm.Usage{PromptTokens: 9, CompletionTokens: 3}, nil,
		llm.Delta{Text: "Hello", TokenIDs: []int32{1}}, llm.Delta{Text: " there", TokenIDs: []int32{2, 3}, FinishReason: "stop"}), nil))
	rec := do(s, http.MethodPost, "/v1/messages", anthropicHello+`}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	require.JSONEq(t, `{"id":"msg_test","type":"message","role":"assistant","model":"test-model",
		"content":[{"type":"text","text":"Hello there"}],"stop_reason":"end_turn","stop_sequence":null,
		"usage":{"input_tokens":9,"output_tokens":3}}`, rec.Body.String())
}

// anthropicEvent formats one SSE event as the server writes it.
func anthropicEvent(name, data string) string {
	return "event: " + name + "\ndata: " + data + "\n\n"
}

func TestAnthropicStreamBytes(t *testing.T) {
	s := newTestServer(t, backendWith(scripted(llm.Usage{PromptTokens: 9, CompletionTokens: 3}, nil,
		llm.Delta{Text: "Hello", TokenIDs: []int32{1}}, llm.Delta{TokenIDs: []int32{2}},
		llm.Delta{Text: " there", TokenIDs: []int32{3}, FinishReason: "length"}), nil))
	rec := do(s, http.MethodPost, "/v1/messages", anthropicHello+`,"stream":true}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	require.Equal(t, "text/event-stream", rec.Header().Get("Content-Type"))
	want := anthropicEvent("message_start", `{"message":{"id":"msg_test","type":"message","role":"assistant","model":"test-model","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":0,"output_tokens":0}},"type":"message_start"}`) +
		anthropicEvent("ping", `{"type":"ping"}`) +
		anthropicEvent("content_block_start", `{"content_block":{"text":"","type":"text"},"index":0,"type":"content_block_start"}`) +
		anthropicEvent("content_block_delta", `{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}`) +
		anthropicEvent("content_block_delta", `{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" there"}}`) +
		anthropicEvent("content_block_stop", `{"index":0,"type":"content_block_stop"}`) +
		anthropicEvent("message_delta", `{"delta":{"stop_reason":"max_tokens","stop_sequence":null},"type":"message_delta","usage":{"input_tokens":9,"output_tokens":3}}`) +
		anthropicEvent("message_stop", `{"type":"message_stop"}`)
	require.Equal(t, want, rec.Body.String())
}

func TestAnthropicStreamInputTokensAtStart(t *testing.T) {
	st := &promptStream{scripted(llm.Usage{PromptTokens: 4, CompletionTokens: 1}, nil, llm.Delta{Text: "a", FinishReason: "stop"}), []int32{5, 6, 7, 8}}
	s := newTestServer(t, backendWith(st, nil))
	rec := do(s, http.MethodPost, "/v1/messages", anthropicHello+`,"stream":true}`)
	require.Contains(t, rec.Body.String(), `"usage":{"input_tokens":4,"output_tokens":0}},"type":"message_start"}`)
}

// sseData returns the data of each event of an Anthropic stream, decoded, with its event name.
func sseEvents(t *testing.T, body string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, ev := range strings.Split(strings.TrimSuffix(body, "\n\n"), "\n\n") {
		lines := strings.Split(ev, "\n")
		require.Len(t, lines, 2, "event %q", ev)
		name, ok := strings.CutPrefix(lines[0], "event: ")
		require.True(t, ok, ev)
		data, ok := strings.CutPrefix(lines[1], "data: ")
		require.True(t, ok, ev)
		var m map[string]any
		require.NoError(t, json.Unmarshal([]byte(data), &m))
		require.Equal(t, name, m["type"], "event name and data type differ")
		out = append(out, m)
	}
	return out
}

// accumulate rebuilds the final message from stream events as the SDK's accumulator does.
func accumulate(t *testing.T, events []map[string]any) map[string]any {
	t.Helper()
	var msg map[string]any
	var content []map[string]any
	partial := map[int]string{}
	for _, ev := range events {
		switch ev["type"] {
		case "message_start":
			msg = ev["message"].(map[string]any)
		case "content_block_start":
			require.Equal(t, float64(len(content)), ev["index"])
			content = append(content, ev["content_block"].(map[string]any))
		case "content_block_delta":
			i := int(ev["index"].(float64))
			d := ev["delta"].(map[string]any)
			switch d["type"] {
			case "text_delta":
				content[i]["text"] = content[i]["text"].(string) + d["text"].(string)
			case "input_json_delta":
				partial[i] += d["partial_json"].(string)
			default:
				t.Fatalf("delta %v", d)
			}
		case "message_delta":
			d := ev["delta"].(map[string]any)
			msg["stop_reason"], msg["stop_sequence"] = d["stop_reason"], d["stop_sequence"]
			msg["usage"] = ev["usage"]
		}
	}
	for i, p := range partial {
		var in any
		require.NoError(t, json.Unmarshal([]byte(p), &in), "tool input %q", p)
		content[i]["input"] = in
	}
	blocks := make([]any, len(content))
	for i, b := range content {
		blocks[i] = b
	}
	msg["content"] = blocks
	return msg
}

// both answers body streamed and not, and checks that the stream accumulates to the same
// message; it returns the non-streamed message.
func both(t *testing.T, newBackend func() llm.Generator, body string) map[string]any {
	t.Helper()
	rec := do(newTestServer(t, newBackend()), http.MethodPost, "/v1/messages", body+`}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	var whole map[string]any
	require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &whole))
	rec = do(newTestServer(t, newBackend()), http.MethodPost, "/v1/messages", body+`,"stream":true}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	require.Equal(t, whole, accumulate(t, sseEvents(t, rec.Body.String())))
	return whole
}

func TestAnthropicStopReasons(t *testing.T) {
	for _, tc := range []struct {
		name          string
		stops         string
		deltas        []string
		finish        string
		wantText      string
		wantReason    any
		wantStopMatch any
	}{
		{"end_turn", "", []string{"Hi", " there"}, "stop", "Hi there", "end_turn", nil},
		{"max_tokens", "", []string{"Hi"}, "length", "Hi", "max_tokens", nil},
		{"abort", "", []string{"Hi"}, "abort", "Hi", nil, nil},
		{"stop sequence split over deltas", `["STOP","END"]`, []string{"Hi E", "N", "D"}, "stop", "Hi ", "stop_sequence", "END"},
		{"held prefix that is not a stop", `["END"]`, []string{"Hi E", "N", "ding"}, "stop", "Hi ENding", "end_turn", nil},
		{"stop sequence in the last delta", `["END"]`, []string{"Hi", " theEND"}, "stop", "Hi the", "stop_sequence", "END"},
		{"the longer of two", `["D","END"]`, []string{"xxEND"}, "stop", "xx", "stop_sequence", "END"},
		{"length keeps the text", `["END"]`, []string{"Hi E"}, "length", "Hi E", "max_tokens", nil},
		{"eos with stops", `["END"]`, []string{"Hi"}, "stop", "Hi", "end_turn", nil},
		{"multibyte", `["éé"]`, []string{"aé", "é"}, "stop", "a", "stop_sequence", "éé"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			newBackend := func() llm.Generator {
				ds := make([]llm.Delta, len(tc.deltas))
				for i, d := range tc.deltas {
					ds[i] = llm.Delta{Text: d, TokenIDs: []int32{int32(i)}}
				}
				ds[len(ds)-1].FinishReason = tc.finish
				return backendWith(scripted(llm.Usage{PromptTokens: 2, CompletionTokens: len(ds)}, nil, ds...), nil)
			}
			body := anthropicHello
			if tc.stops != "" {
				body += `,"stop_sequences":` + tc.stops
			}
			msg := both(t, newBackend, body)
			require.Equal(t, []any{map[string]any{"type": "text", "text": tc.wantText}}, msg["content"])
			require.Equal(t, tc.wantReason, msg["stop_reason"])
			require.Equal(t, tc.wantStopMatch, msg["stop_sequence"])
		})
	}
}

func TestAnthropicStreamHoldsBackStopPrefix(t *testing.T) {
	s := newTestServer(t, backendWith(scripted(llm.Usage{}, nil,
		llm.Delta{Text: "Hi E"}, llm.Delta{Text: "N"}, llm.Delta{Text: "D", FinishReason: "stop"}), nil))
	rec := do(s, http.MethodPost, "/v1/messages", anthropicHello+`,"stop_sequences":["END"],"stream":true}`)
	require.NotContains(t, rec.Body.String(), `"text":"Hi E"`)
	require.Contains(t, rec.Body.String(), `"text":"Hi "`)
	require.NotContains(t, rec.Body.String(), `END"}}`)
}

const anthropicWeatherTool = `"tools":[{"name":"get_weather","description":"Weather","input_schema":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}]`

func TestAnthropicForcedToolUse(t *testing.T) {
	info := testInfo
	info.StructuredOutputs = true
	for _, tc := range []struct {
		name, choice string
		text         []string
		wantName     string
	}{
		{"tool", `{"type":"tool","name":"get_weather"}`, []string{`{"ci`, `ty": "Par`, `is"}`}, "get_weather"},
		{"any", `{"type":"any"}`, []string{`[{"name": "get_`, `weather", "parameters": {"city"`, `: "Paris"}}]`}, "get_weather"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got llm.Request
			newBackend := func() llm.Generator {
				ds := make([]llm.Delta, len(tc.text))
				for i, x := range tc.text {
					ds[i] = llm.Delta{Text: x, TokenIDs: []int32{1}}
				}
				ds[len(ds)-1].FinishReason = "stop"
				b := backendWith(scripted(llm.Usage{PromptTokens: 5, CompletionTokens: 3}, nil, ds...), &got)
				b.info = info
				return b
			}
			msg := both(t, newBackend, anthropicHello+`,`+anthropicWeatherTool+`,"tool_choice":`+tc.choice)
			require.Equal(t, "tool_use", msg["stop_reason"])
			require.Equal(t, []any{map[string]any{"type": "tool_use", "id": "toolu_test", "name": tc.wantName,
				"input": map[string]any{"city": "Paris"}}}, msg["content"])
			require.NotNil(t, got.Sampling.StructuredOutputs)
			require.Equal(t, "tool_choice", got.Sampling.StructuredOutputs.Param)
			require.JSONEq(t, `[{"type":"function","function":{"name":"get_weather","description":"Weather","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}]`, string(got.Tools))
		})
	}
}

func TestAnthropicAutoToolUse(t *testing.T) {
	info := testInfo
	info.ToolCallParser = "hermes"
	var got llm.Request
	newBackend := func() llm.Generator {
		b := backendWith(scripted(llm.Usage{PromptTokens: 5, CompletionTokens: 9}, nil,
			llm.Delta{Text: "Checking.", TokenIDs: []int32{1}},
			llm.Delta{TokenIDs: []int32{2}, ToolCalls: []llm.ToolCallDelta{{Index: 0, ID: "chatcmpl-tool-abc", Type: "function", Name: "get_weather"}}},
			llm.Delta{TokenIDs: []int32{3}, ToolCalls: []llm.ToolCallDelta{{Index: 0, Arguments: `{"city": `}}},
			llm.Delta{TokenIDs: []int32{4}, ToolCalls: []llm.ToolCallDelta{{Index: 0, Arguments: `"Paris"}`}}},
			llm.Delta{TokenIDs: []int32{5}, ToolCalls: []llm.ToolCallDelta{{Index: 1, ID: "chatcmpl-tool-def", Type: "function", Name: "get_weather", Arguments: `{"city": "Rome"}`}}},
			llm.Delta{TokenIDs: []int32{6}, FinishReason: "tool_calls"}), &got)
		b.info = info
		return b
	}
	msg := both(t, newBackend, anthropicHello+`,`+anthropicWeatherTool)
	require.Equal(t, "tool_use", msg["stop_reason"])
	require.Equal(t, []any{
		map[string]any{"type": "text", "text": "Checking."},
		map[string]any{"type": "tool_use", "id": "toolu_abc", "name": "get_weather", "input": map[string]any{"city": "Paris"}},
		map[string]any{"type": "tool_use", "id": "toolu_def", "name": "get_weather", "input": map[string]any{"city": "Rome"}},
	}, msg["content"])
	require.NotNil(t, got.Parsing)
	require.True(t, got.Parsing.ToolCalls)
	require.Nil(t, got.Sampling.StructuredOutputs)

	// disable_parallel_tool_use keeps the first call only.
	rec := do(newTestServer(t, newBackend()), http.MethodPost, "/v1/messages",
		anthropicHello+`,`+anthropicWeatherTool+`,"tool_choice":{"type":"auto","disable_parallel_tool_use":true}}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	require.Equal(t, 1, strings.Count(rec.Body.String(), `"type":"tool_use"`), rec.Body.String())
}

func TestAnthropicThinking(t *testing.T) {
	info := testInfo
	info.ReasoningParser = "deepseek_r1"
	newBackend := func() llm.Generator {
		b := backendWith(scripted(llm.Usage{PromptTokens: 5, CompletionTokens: 3}, nil,
			llm.Delta{Reasoning: "hmm", TokenIDs: []int32{1}}, llm.Delta{Text: "Yes.", TokenIDs: []int32{2}, FinishReason: "stop"}), nil)
		b.info = info
		return b
	}
	rec := do(newTestServer(t, newBackend()), http.MethodPost, "/v1/messages", anthropicHello+`,"thinking":{"type":"adaptive"},"stream":true}`)
	require.Contains(t, rec.Body.String(), `"delta":{"type":"thinking_delta","thinking":"hmm"}`)
	rec = do(newTestServer(t, newBackend()), http.MethodPost, "/v1/messages", anthropicHello+`,"thinking":{"type":"adaptive"}}`)
	require.Contains(t, rec.Body.String(), `"content":[{"signature":"","thinking":"hmm","type":"thinking"},{"text":"Yes.","type":"text"}]`)
	// Without thinking the reasoning is split off and dropped.
	rec = do(newTestServer(t, newBackend()), http.MethodPost, "/v1/messages", anthropicHello+`}`)
	require.Contains(t, rec.Body.String(), `"content":[{"text":"Yes.","type":"text"}]`)
}

func TestAnthropicStreamErrorAfterStart(t *testing.T) {
	s := newTestServer(t, backendWith(scripted(llm.Usage{}, &llm.RequestError{Status: 500, Type: "InternalServerError", Message: "boom"},
		llm.Delta{Text: "Hi"}), nil))
	rec := do(s, http.MethodPost, "/v1/messages", anthropicHello+`,"stream":true}`)
	require.Equal(t, http.StatusOK, rec.Code)
	require.True(t, strings.HasSuffix(rec.Body.String(),
		anthropicEvent("error", `{"type":"error","error":{"type":"api_error","message":"boom"}}`)), rec.Body.String())

	// Before any output, the error gets its status.
	s = newTestServer(t, backendWith(scripted(llm.Usage{}, llm.ErrEngineDead), nil))
	requireAnthropicError(t, do(s, http.MethodPost, "/v1/messages", anthropicHello+`,"stream":true}`), 503, "overloaded_error", "dead")
	s = newTestServer(t, &fakeBackend{info: testInfo, generateFn: func(context.Context, llm.Request) (llm.TokenStream, error) {
		return nil, &llm.RequestError{Status: 400, Type: "BadRequestError", Param: "messages", Message: "prompt too long"}
	}})
	requireAnthropicError(t, do(s, http.MethodPost, "/v1/messages", anthropicHello+`}`), 400, "invalid_request_error", "messages: prompt too long")
}

func TestAnthropicAuthAndRoutes(t *testing.T) {
	s := newTestServer(t, backendWith(nil, nil), func(c *Config) { c.APIKey = "sekret" })
	send := func(path, header, value string) *httptest.ResponseRecorder {
		req := newRequest(http.MethodPost, path, `{}`)
		if header != "" {
			req.Header.Set(header, value)
		}
		return serve(s, req)
	}
	// A valid key gets past auth (then a 400 for the empty body), either header.
	requireAnthropicError(t, send("/v1/messages", "x-api-key", "sekret"), 400, "invalid_request_error", "model")
	requireAnthropicError(t, send("/v1/messages", "Authorization", "Bearer sekret"), 400, "invalid_request_error", "model")
	requireError(t, send("/v1/chat/completions", "x-api-key", "sekret"), 400, "BadRequestError", "messages")
	// A bad or missing key: 401 in each route's shape.
	requireAnthropicError(t, send("/v1/messages", "x-api-key", "wrong"), 401, "authentication_error", "API key")
	requireAnthropicError(t, send("/v1/messages/count_tokens", "", ""), 401, "authentication_error", "API key")
	requireError(t, send("/v1/chat/completions", "x-api-key", "wrong"), 401, "AuthenticationError", "")
	// 404 and 405 under /v1/messages.
	requireAnthropicError(t, do(s, http.MethodPost, "/v1/messages/batches", `{}`), 404, "not_found_error", "/v1/messages/batches")
	rec := do(s, http.MethodGet, "/v1/messages", "")
	requireAnthropicError(t, rec, 405, "invalid_request_error", "POST")
	require.Equal(t, "POST", rec.Header().Get("Allow"))
}

// tokenizingBackend is a fake backend that also tokenizes: one token per word of each message.
type tokenizingBackend struct {
	*fakeBackend
	got *llm.TokenizeRequest
}

func (b tokenizingBackend) Tokenize(_ context.Context, req llm.TokenizeRequest) (llm.TokenizeResult, error) {
	*b.got = req
	var ids []int32
	for _, m := range req.Messages {
		for range strings.Fields(m.Content) {
			ids = append(ids, 1)
		}
	}
	return llm.TokenizeResult{TokenIDs: ids}, nil
}

func (tokenizingBackend) Detokenize(context.Context, []int32) (string, error) { return "", nil }

func TestAnthropicCountTokens(t *testing.T) {
	info := testInfo
	info.StructuredOutputs = true
	var got llm.TokenizeRequest
	fb := backendWith(nil, nil)
	fb.info = info
	s := newTestServer(t, tokenizingBackend{fb, &got})
	rec := do(s, http.MethodPost, "/v1/messages/count_tokens", `{"model":"test-model","system":"be brief","messages":[{"role":"user","content":"one two three"}],`+anthropicWeatherTool+`,"tool_choice":{"type":"any"}}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	require.JSONEq(t, `{"input_tokens":5}`, rec.Body.String())
	require.True(t, got.AddGenerationPrompt)
	require.Equal(t, []llm.Message{{Role: "system", Content: "be brief"}, {Role: "user", Content: "one two three"}}, got.Messages)
	require.Contains(t, string(got.Tools), `"get_weather"`)

	requireAnthropicError(t, do(s, http.MethodPost, "/v1/messages/count_tokens", `{"model":"test-model","max_tokens":5,"messages":[{"role":"user","content":"x"}]}`),
		400, "invalid_request_error", "max_tokens")
	requireAnthropicError(t, do(s, http.MethodPost, "/v1/messages/count_tokens", `{"model":"test-model","messages":[]}`),
		400, "invalid_request_error", "messages")
	// A backend that cannot tokenize.
	s = newTestServer(t, backendWith(nil, nil))
	requireAnthropicError(t, do(s, http.MethodPost, "/v1/messages/count_tokens", `{"model":"test-model","messages":[{"role":"user","content":"x"}]}`),
		501, "api_error", "tokenize")
}

func TestAnthropicClientDisconnect(t *testing.T) {
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
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/v1/messages", strings.NewReader(anthropicHello+`,"stream":true}`))
	require.NoError(t, err)
	resp, err := srv.Client().Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	br := bufio.NewReader(resp.Body)
	for {
		line, err := br.ReadString('\n')
		require.NoError(t, err)
		if strings.Contains(line, `"text":"first"`) {
			break
		}
	}
	cancel()
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
}

func TestHeldStop(t *testing.T) {
	for _, tc := range []struct {
		text  string
		stops []string
		want  int
	}{
		{"abc", []string{"END"}, 0},
		{"abE", []string{"END"}, 1},
		{"abEN", []string{"END"}, 2},
		{"abEN", []string{"END", "N"}, 2},
		{"", []string{"END"}, 0},
		{"aé", []string{"éé"}, len("é")},
	} {
		t.Run(fmt.Sprintf("%q", tc.text), func(t *testing.T) {
			require.Equal(t, tc.want, heldStop(tc.text, tc.stops))
		})
	}
}

// FuzzDecodeMessages feeds arbitrary bodies through POST /v1/messages: none may panic, get a
// 5xx or reach the backend invalid; errors have Anthropic's shape, streams end with message_stop.
func FuzzDecodeMessages(f *testing.F) {
	fuzzSeeds(f,
		anthropicHello+`}`,
		anthropicHello+`,"stream":true,"stop_sequences":["x"],"temperature":0.2,"top_p":0.5,"top_k":3}`,
		`{"model":"m","max_tokens":3,"system":[{"type":"text","text":"s"}],"messages":[{"role":"user","content":[{"type":"text","text":"q"}]}]}`,
		`{"model":"test-model","max_tokens":3,"messages":[{"role":"user","content":"w"},{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"f","input":{}}]},{"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":"r","is_error":true}]}],"tools":[{"name":"f","input_schema":{"type":"object"}}],"tool_choice":{"type":"any"},"stream":true}`,
		`{"model":"test-model","max_tokens":3,"messages":[{"role":"user","content":"w"}],"tools":[{"name":"f","input_schema":{"type":"object"}}],"tool_choice":{"type":"tool","name":"f","disable_parallel_tool_use":true}}`,
		`{"model":"test-model","max_tokens":3,"messages":[{"role":"user","content":"w"}],"thinking":{"type":"adaptive"},"metadata":{"user_id":null},"service_tier":"auto"}`,
		`{"model":`, `[]`, `null`, `{"messages":[{"role":"user","content":[{"type":"image"}]}]}`,
	)
	f.Fuzz(func(t *testing.T, body []byte) {
		s := fuzzServer(t)
		rec := httptest.NewRecorder()
		s.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/v1/messages", strings.NewReader(string(body))))
		switch {
		case rec.Code == http.StatusOK && rec.Header().Get("Content-Type") == "text/event-stream":
			require.True(t, strings.HasSuffix(rec.Body.String(), anthropicEvent("message_stop", `{"type":"message_stop"}`)), rec.Body.String())
		case rec.Code == http.StatusOK:
			require.True(t, json.Valid(rec.Body.Bytes()), rec.Body.String())
		default:
			require.True(t, rec.Code >= 400 && rec.Code < 500, "status %d: %s", rec.Code, rec.Body)
			var e anthropicErrorBody
			require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &e))
			require.Equal(t, "error", e.Type)
			require.NotEmpty(t, e.Error.Type)
			require.NotEmpty(t, e.Error.Message)
		}
	})
}
