package server

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/govllm/govllm/llm"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// fakeBackend is a Backend whose behaviour each test sets through function fields.
type fakeBackend struct {
	info       llm.ModelInfo
	generateFn func(ctx context.Context, req llm.Request) (llm.TokenStream, error)
	healthFn   func() error
}

func (f *fakeBackend) Generate(ctx context.Context, req llm.Request) (llm.TokenStream, error) {
	return f.generateFn(ctx, req)
}

func (f *fakeBackend) Model() llm.ModelInfo { return f.info }

func (f *fakeBackend) Health() error {
	if f.healthFn == nil {
		return nil
	}
	return f.healthFn()
}

// fakeStream is a llm.TokenStream whose Recv is a function field. It records Close.
type fakeStream struct {
	recvFn    func() (llm.Delta, error)
	usage     llm.Usage
	closeOnce sync.Once
	closed    chan struct{}
}

func newFakeStream(recv func() (llm.Delta, error), u llm.Usage) *fakeStream {
	return &fakeStream{recvFn: recv, usage: u, closed: make(chan struct{})}
}

func (s *fakeStream) Recv() (llm.Delta, error) { return s.recvFn() }
func (s *fakeStream) Usage() llm.Usage         { return s.usage }
func (s *fakeStream) Close()                   { s.closeOnce.Do(func() { close(s.closed) }) }

func (s *fakeStream) isClosed() bool {
	select {
	case <-s.closed:
		return true
	default:
		return false
	}
}

// scripted returns a stream that yields deltas in order and then end (io.EOF when nil).
func scripted(u llm.Usage, end error, deltas ...llm.Delta) *fakeStream {
	if end == nil {
		end = io.EOF
	}
	i := 0
	return newFakeStream(func() (llm.Delta, error) {
		if i < len(deltas) {
			i++
			return deltas[i-1], nil
		}
		return llm.Delta{}, end
	}, u)
}

const (
	testModel   = "test-model"
	testID      = "chatcmpl-test"
	testCreated = 1700000000
)

var testInfo = llm.ModelInfo{ID: testModel, Root: "/models/test", MaxModelLen: 2048, Backend: "fake"}

// backendWith returns a backend that records the request and answers with stream.
func backendWith(stream llm.TokenStream, got *llm.Request) *fakeBackend {
	return &fakeBackend{info: testInfo, generateFn: func(_ context.Context, req llm.Request) (llm.TokenStream, error) {
		if got != nil {
			*got = req
		}
		return stream, nil
	}}
}

// newTestServer returns a Server with a fixed id and clock that logs to the test.
func newTestServer(t *testing.T, b llm.Generator, opts ...func(*Config)) *Server {
	t.Helper()
	cfg := Config{
		Backend: b,
		Logger:  slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	for _, o := range opts {
		o(&cfg)
	}
	s := New(cfg)
	s.now = func() time.Time { return time.Unix(testCreated, 0) }
	s.newID = func(prefix string) string { return prefix + "test" }
	s.created = testCreated
	return s
}

// newRequest returns a request for the handler with a JSON body, if any.
func newRequest(method, path, body string) *http.Request {
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req := httptest.NewRequest(method, path, r)
	req.Header.Set("Content-Type", "application/json")
	return req
}

// serve passes req through the handler.
func serve(h http.Handler, req *http.Request) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec
}

// do sends one request through the handler.
func do(h http.Handler, method, path, body string) *httptest.ResponseRecorder {
	return serve(h, newRequest(method, path, body))
}

// chunk formats the SSE event of one chat.completion.chunk choice as the server must write it.
func chunk(index int, delta, finish string) string {
	if finish != "null" {
		finish += `,"stop_reason":null` // a finish chunk's stop_reason (null: EOS or length)
	}
	return fmt.Sprintf(`data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":"%s",`+
		`"choices":[{"index":%d,"delta":%s,"logprobs":null,"finish_reason":%s}]}`+"\n\n",
		testID, testCreated, testModel, index, delta, finish)
}

func roleChunk(index int) string { return chunk(index, `{"role":"assistant","content":""}`, "null") }

func textChunk(index int, text string) string {
	var b strings.Builder
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(text)
	return chunk(index, `{"content":`+strings.TrimSuffix(b.String(), "\n")+`}`, "null")
}

// testFingerprint is the system_fingerprint of testInfo's responses.
const testFingerprint = "govllm-fake"

// finishChunk is a choice's finish chunk in a stream without usage: it carries the fingerprint.
func finishChunk(index int, reason string) string {
	c := chunk(index, `{}`, `"`+reason+`"`)
	return strings.TrimSuffix(c, "}\n\n") + `,"system_fingerprint":"` + testFingerprint + `"}` + "\n\n"
}

// finishChunkU is a choice's finish chunk in a stream with usage, whose usage chunk carries the
// fingerprint.
func finishChunkU(index int, reason string) string { return chunk(index, `{}`, `"`+reason+`"`) }

func usageChunk(prompt, completion int) string {
	return fmt.Sprintf(`data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":"%s",`+
		`"choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d},"system_fingerprint":"%s"}`+"\n\n",
		testID, testCreated, testModel, prompt, completion, prompt+completion, testFingerprint)
}

const doneEvent = "data: [DONE]\n\n"

// errorJSON is an error body as the client decodes it.
type errorJSON struct {
	Error struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    int     `json:"code"`
	} `json:"error"`
}

// requireError checks that rec holds an error answer with the given status, type and param
// ("" meaning null), and returns its message.
func requireError(t *testing.T, rec *httptest.ResponseRecorder, status int, typ, param string) string {
	t.Helper()
	require.Equal(t, status, rec.Code, "body: %s", rec.Body)
	require.Equal(t, "application/json", rec.Header().Get("Content-Type"))
	var e errorJSON
	require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &e), "body: %s", rec.Body)
	require.Equal(t, status, e.Error.Code)
	require.Equal(t, typ, e.Error.Type)
	if param == "" {
		require.Nil(t, e.Error.Param, "param")
	} else {
		require.NotNil(t, e.Error.Param, "param")
		require.Equal(t, param, *e.Error.Param)
	}
	require.NotEmpty(t, e.Error.Message)
	return e.Error.Message
}
