package test

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// do sends one request to the scripted server, with its API key unless auth says otherwise
// ("-" for none), and returns the status, the decoded error (if any) and the raw body.
func doScripted(t *testing.T, method, path, auth string, body []byte) (int, http.Header, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, scripted.URL+path, bytes.NewReader(body))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	switch auth {
	case "":
		req.Header.Set("Authorization", "Bearer "+scriptedKey)
	case "-":
	default:
		req.Header.Set("Authorization", auth)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, resp.Header, b
}

type apiErr struct {
	Error struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    int     `json:"code"`
	} `json:"error"`
}

// TestHostileRequests sends malformed and hostile requests to the running binary: each gets the
// right 4xx with an OpenAI error body naming the field, and the server serves on.
func TestHostileRequests(t *testing.T) {
	msgs := `"messages":[{"role":"user","content":"echo:ok"}]`
	chat := func(extra string) string { return `{` + msgs + extra + `}` }
	deep := `{"messages":` + strings.Repeat("[", 100000) + strings.Repeat("]", 100000) + `}`
	huge := `{"messages":[{"role":"user","content":"` + strings.Repeat("A", 10<<20) + `"}]}`
	const chatPath, textPath = "/v1/chat/completions", "/v1/completions"
	tests := []struct {
		name, method, path, auth, body string
		status                         int
		typ, param                     string // param "" means null
	}{
		{name: "bad JSON", body: `{"messages":`},
		{name: "trailing garbage", body: chat(``) + ` {}`},
		{name: "empty body", body: ``},
		{name: "whitespace body", body: " \n\t "},
		{name: "array body", body: `[{"role":"user","content":"hi"}]`},
		{name: "string body", body: `"hi"`},
		{name: "null body", body: `null`, param: "messages"},
		{name: "invalid UTF-8", body: "{\"messages\":[{\"role\":\"user\",\"content\":\"\xc3\x28\xff\"}]}"},
		{name: "nested 100k deep", body: deep},
		{name: "no messages", body: `{"model":"model"}`, param: "messages"},
		{name: "empty messages", body: `{"messages":[]}`, param: "messages"},
		{name: "messages an object", body: `{"messages":{"role":"user"}}`, param: "messages"},
		{name: "message a string", body: `{"messages":["hi"]}`, param: "messages"},
		{name: "unknown role", body: `{"messages":[{"role":"wizard","content":"hi"}]}`, param: "messages[0].role"},
		{name: "missing role", body: `{"messages":[{"content":"hi"}]}`, param: "messages[0].role"},
		{name: "tool message without tool_call_id", body: `{"messages":[{"role":"tool","content":"hi"}]}`, param: "messages[0].tool_call_id"},
		{name: "numeric content", body: `{"messages":[{"role":"user","content":42}]}`, param: "messages[0].content"},
		{name: "null user content", body: `{"messages":[{"role":"user","content":null}]}`, param: "messages[0].content"},
		{name: "image part", body: `{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"http://x"}}]}]}`, param: "messages[0].content"},
		{name: "negative max_tokens", body: chat(`,"max_tokens":-5`), param: "max_tokens"},
		{name: "zero max_tokens", body: chat(`,"max_tokens":0`), param: "max_tokens"},
		{name: "max_tokens over the context", body: chat(`,"max_tokens":1000000000`), param: "max_tokens"},
		{name: "max_tokens beyond int64", body: chat(`,"max_tokens":1e30`), param: "max_tokens"},
		{name: "max_tokens a string", body: chat(`,"max_tokens":"10"`), param: "max_tokens"},
		{name: "max_completion_tokens fraction", body: chat(`,"max_completion_tokens":2.5`), param: "max_completion_tokens"},
		{name: "temperature too high", body: chat(`,"temperature":3`), param: "temperature"},
		{name: "temperature negative", body: chat(`,"temperature":-1`), param: "temperature"},
		{name: "temperature a string", body: chat(`,"temperature":"hot"`), param: "temperature"},
		{name: "top_p zero", body: chat(`,"top_p":0`), param: "top_p"},
		{name: "top_p above one", body: chat(`,"top_p":2`), param: "top_p"},
		{name: "top_k negative", body: chat(`,"top_k":-5`), param: "top_k"},
		{name: "min_p above one", body: chat(`,"min_p":2`), param: "min_p"},
		{name: "presence_penalty", body: chat(`,"presence_penalty":5`), param: "presence_penalty"},
		{name: "frequency_penalty", body: chat(`,"frequency_penalty":-5`), param: "frequency_penalty"},
		{name: "repetition_penalty", body: chat(`,"repetition_penalty":-1`), param: "repetition_penalty"},
		{name: "min_tokens over max_tokens", body: chat(`,"max_tokens":2,"min_tokens":3`), param: "min_tokens"},
		{name: "n zero", body: chat(`,"n":0`), param: "n"},
		{name: "n huge", body: chat(`,"n":100000`), param: "n"},
		{name: "stop a number", body: chat(`,"stop":5`), param: "stop"},
		{name: "stop empty string", body: chat(`,"stop":[""]`), param: "stop"},
		{name: "seed a string", body: chat(`,"seed":"abc"`), param: "seed"},
		{name: "stream a string", body: chat(`,"stream":"yes"`), param: "stream"},
		{name: "stream_options without stream", body: chat(`,"stream_options":{"include_usage":true}`), param: "stream_options"},
		{name: "top_logprobs above 20", body: chat(`,"logprobs":true,"top_logprobs":21`), param: "top_logprobs"},
		{name: "tools", body: chat(`,"tools":[{"type":"function","function":{"name":"f"}}]`), param: "tool_choice"}, // auto without a parser
		{name: "logit_bias", body: chat(`,"logit_bias":{"1":100}`), param: "logit_bias"},
		{name: "json_schema", body: chat(`,"response_format":{"type":"json_schema"}`), param: "response_format.json_schema"},
		{name: "user not a string", body: chat(`,"user":{"id":1}`), param: "user"},
		{name: "refused by the engine", body: `{"messages":[{"role":"user","content":"badrequest:no"}]}`, param: "messages"},
		{name: "unknown model", body: `{"model":"gpt-4o",` + msgs + `}`, status: 404, typ: "NotFoundError", param: "model"},
		{name: "10 MB body", body: huge, status: 413, typ: "RequestTooLargeError"},
		{name: "no API key", auth: "-", body: chat(``), status: 401, typ: "AuthenticationError"},
		{name: "wrong API key", auth: "Bearer sk-wrong", body: chat(``), status: 401, typ: "AuthenticationError"},
		{name: "API key as Basic", auth: "Basic " + scriptedKey, body: chat(``), status: 401, typ: "AuthenticationError"},
		{name: "GET a POST route", method: http.MethodGet, status: 405, typ: "MethodNotAllowedError"},
		{name: "unknown route", path: "/v1/engines", status: 404, typ: "NotFoundError"},
		{name: "text: no prompt", path: textPath, body: `{"max_tokens":3}`, param: "prompt"},
		{name: "text: prompts of mixed kinds", path: textPath, body: `{"prompt":["a",[1]]}`, param: "prompt"},
		{name: "text: negative token id", path: textPath, body: `{"prompt":[1,-1]}`, param: "prompt"},
		{name: "text: prompt an object", path: textPath, body: `{"prompt":{"text":"a"}}`, param: "prompt"},
		{name: "text: suffix", path: textPath, body: `{"prompt":"a","suffix":"b"}`, param: "suffix"},
		{name: "text: max_tokens negative", path: textPath, body: `{"prompt":"a","max_tokens":-1}`, param: "max_tokens"},
	}
	require.GreaterOrEqual(t, len(tests), 40)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.method == "" {
				tt.method = http.MethodPost
			}
			if tt.path == "" {
				tt.path = chatPath
			}
			if tt.status == 0 {
				tt.status, tt.typ = http.StatusBadRequest, "BadRequestError"
			}
			status, _, b := doScripted(t, tt.method, tt.path, tt.auth, []byte(tt.body))
			require.Equal(t, tt.status, status, "%s", b)
			var e apiErr
			require.NoError(t, json.Unmarshal(b, &e), "%s", b)
			require.Equal(t, tt.status, e.Error.Code)
			require.Equal(t, tt.typ, e.Error.Type)
			require.NotEmpty(t, e.Error.Message)
			if tt.param == "" {
				require.Nil(t, e.Error.Param, "param: %s", b)
			} else {
				require.NotNil(t, e.Error.Param, "param: %s", b)
				require.Equal(t, tt.param, *e.Error.Param)
			}

			// The server serves on.
			status, _, b = doScripted(t, http.MethodPost, chatPath, "", []byte(chat(``)))
			require.Equal(t, http.StatusOK, status, "%s", b)
			require.Contains(t, string(b), `"content":"ok"`)
		})
	}
}
