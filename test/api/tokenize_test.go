package api

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestTokenize runs tokenize_test.py: /tokenize, /detokenize and /version on both backends
// (UTF-8 round trip, counts equal to a chat completion's prompt_tokens, the errors).
func TestTokenize(t *testing.T) {
	runPytest(t, "tokenize_test.py")
}

// TestRequestIDHeaders checks that a client's X-Request-Id names the engine request (the body's
// "chatcmpl-<id>"), comes back in the response header and is in the server's log, and that a
// bad one is refused naming the header.
func TestRequestIDHeaders(t *testing.T) {
	forEach(t, func(t *testing.T, s server) {
		id := "e2e-" + s.Name + "-" + time.Now().Format("150405.000000")
		post := func(path, body, reqID string) (*http.Response, []byte) {
			req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, s.URL+path, strings.NewReader(body))
			require.NoError(t, err)
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Authorization", "Bearer "+apiKey)
			if reqID != "" {
				req.Header.Set("X-Request-Id", reqID)
			}
			resp, err := http.DefaultClient.Do(req)
			require.NoError(t, err)
			defer resp.Body.Close()
			b, err := io.ReadAll(resp.Body)
			require.NoError(t, err)
			return resp, b
		}
		resp, body := post("/v1/chat/completions",
			`{"messages":[{"role":"user","content":"Say hi"}],"max_tokens":2,"temperature":0}`, id)
		require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
		require.Equal(t, id, resp.Header.Get("X-Request-Id"))
		var chat struct {
			ID string `json:"id"`
		}
		require.NoError(t, json.Unmarshal(body, &chat))
		require.Equal(t, "chatcmpl-"+id, chat.ID)

		resp, body = post("/tokenize", `{"prompt":"hi"}`, id+"-tok")
		require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
		require.Equal(t, id+"-tok", resp.Header.Get("X-Request-Id"))

		resp, body = post("/v1/chat/completions", `{"messages":[]}`, "")
		require.Equal(t, http.StatusBadRequest, resp.StatusCode, "%s", body)
		require.Regexp(t, `^[0-9a-f]{16}$`, resp.Header.Get("X-Request-Id"), "a generated id, echoed on errors too")

		resp, body = post("/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}]}`, "bad id")
		require.Equal(t, http.StatusBadRequest, resp.StatusCode, "%s", body)
		require.Contains(t, string(body), `"param":"X-Request-Id"`)

		require.Eventually(t, func() bool {
			out := s.Srv.Output()
			return strings.Contains(out, "request_id="+id+" ") && strings.Contains(out, "request_id="+id+"-tok ")
		}, 10*time.Second, 100*time.Millisecond, "the server log names the request ids")
	})
}
