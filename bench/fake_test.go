package bench

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fake is an OpenAI-compatible server for the client tests: it answers every completion with
// the same tokens (one per chunk, the role with the first, like govllm), and misbehaves on
// cue.
type fake struct {
	tokens []string
	// mode: "" (well-behaved), "drop" (closes the stream mid-way, no finish, no [DONE]),
	// "nodone" (finishes and sends usage but no [DONE], like transformers serve), "500",
	// "error-event" (an error event after two tokens, then [DONE]), "nousage".
	mode  string
	delay time.Duration // between chunks

	mu       sync.Mutex
	bodies   []map[string]any
	inFlight atomic.Int32
	peak     atomic.Int32
}

func newFake(t *testing.T, f *fake) *httptest.Server {
	t.Helper()
	if f.tokens == nil {
		f.tokens = []string{"The", " capital", " of", " France", " is", " Paris", "."}
	}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	return srv
}

func (f *fake) requests() []map[string]any {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]map[string]any(nil), f.bodies...)
}

func (f *fake) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/v1/models" {
		fmt.Fprint(w, `{"object":"list","data":[{"id":"fake-model","object":"model"},{"id":"other"}]}`)
		return
	}
	n := f.inFlight.Add(1)
	defer f.inFlight.Add(-1)
	for p := f.peak.Load(); n > p && !f.peak.CompareAndSwap(p, n); p = f.peak.Load() {
	}
	var body map[string]any
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		http.Error(w, err.Error(), 400)
		return
	}
	f.mu.Lock()
	f.bodies = append(f.bodies, body)
	f.mu.Unlock()
	if f.mode == "500" {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(500)
		fmt.Fprint(w, `{"error":{"message":"engine is dead","type":"InternalServerError","param":null,"code":500}}`)
		return
	}
	chat := r.URL.Path == "/v1/chat/completions"
	prompt := 0 // a token per 4 bytes of input
	if msgs, ok := body["messages"].([]any); ok {
		for _, m := range msgs {
			prompt += len(m.(map[string]any)["content"].(string))/4 + 3
		}
	} else {
		prompt = len(body["prompt"].(string)) / 4
	}
	toks := f.tokens
	if mt, ok := body["max_tokens"].(float64); ok && int(mt) < len(toks) {
		toks = toks[:int(mt)]
	}
	finish := "stop"
	if len(toks) < len(f.tokens) {
		finish = "length"
	}
	usage := fmt.Sprintf(`{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}`, prompt, len(toks), prompt+len(toks))
	if stream, _ := body["stream"].(bool); !stream {
		text, _ := json.Marshal(strings.Join(toks, ""))
		choice := fmt.Sprintf(`{"index":0,"text":%s,"finish_reason":%q}`, text, finish)
		if chat {
			choice = fmt.Sprintf(`{"index":0,"message":{"role":"assistant","content":%s},"finish_reason":%q}`, text, finish)
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"id":"x","choices":[%s],"usage":%s}`, choice, usage)
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	fl := w.(http.Flusher)
	send := func(s string) {
		time.Sleep(f.delay)
		fmt.Fprintf(w, "data: %s\n\n", s)
		fl.Flush()
	}
	delta := func(tok string, first bool) string {
		b, _ := json.Marshal(tok)
		if !chat {
			return fmt.Sprintf(`{"id":"x","object":"text_completion","choices":[{"index":0,"text":%s,"finish_reason":null}]}`, b)
		}
		role := ""
		if first {
			role = `"role":"assistant",`
		}
		return fmt.Sprintf(`{"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{%s"content":%s},"finish_reason":null}]}`, role, b)
	}
	for i, tok := range toks {
		if f.mode == "drop" && i == 3 {
			return // the handler returns: the chunked body ends without [DONE]
		}
		if f.mode == "error-event" && i == 2 {
			send(`{"error":{"message":"engine died mid-stream","type":"InternalServerError","param":null,"code":500}}`)
			send("[DONE]")
			return
		}
		send(delta(tok, i == 0))
	}
	if chat {
		send(fmt.Sprintf(`{"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":%q}]}`, finish))
	} else {
		send(fmt.Sprintf(`{"id":"x","object":"text_completion","choices":[{"index":0,"text":"","finish_reason":%q}]}`, finish))
	}
	if f.mode != "nousage" {
		send(fmt.Sprintf(`{"id":"x","choices":[],"usage":%s}`, usage))
	}
	if f.mode != "nodone" {
		send("[DONE]")
	}
}
