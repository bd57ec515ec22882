// Package bench is govllm's test and benchmark client for OpenAI-compatible servers (govllm,
// `vllm serve`, `transformers serve`, …): an HTTP and server-sent-events request driver that
// times every request, the scenarios of `govllm bench`, the metric math and the reports.
//
// Metrics follow vLLM's benchmark_serving (vllm/benchmarks/serve.py), so numbers compare
// across tools: TTFT is the time from sending a request to its first chunk with content; ITL
// are the gaps between successive content chunks; TPOT is (E2EL − TTFT) / (output tokens − 1)
// per request; E2EL is the time from sending a request to its last chunk with choices (to the
// whole body, unstreamed). Output tokens come from the server's usage (asked for with
// stream_options.include_usage), else from the count of content chunks.
package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"
)

// Message is one chat message.
type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// Request is one completion request. With Messages it goes to /v1/chat/completions, else
// Prompt goes to /v1/completions.
type Request struct {
	// Label names the request in reports ("turn 2", "temperature 0.5"); optional.
	Label       string
	Messages    []Message
	Prompt      string
	Stream      bool
	MaxTokens   int
	Temperature *float64
	Seed        *int64
	// IgnoreEOS sends ignore_eos: true (vLLM and govllm), so outputs run to MaxTokens.
	IgnoreEOS bool
}

// Result is what one request did: its timings in seconds, as vLLM's benchmark_serving
// records them (ttfts, itls, latencies), its tokens, chunks, finish reason and error.
type Result struct {
	Index  int    `json:"index"`
	Label  string `json:"label,omitempty"`
	Stream bool   `json:"stream"`
	// Success is false when the request failed: a transport error, a non-2xx status, an error
	// event in the stream, a stream with no content, or one that ended without data: [DONE].
	Success    bool   `json:"success"`
	Error      string `json:"error,omitempty"`
	HTTPStatus int    `json:"http_status,omitempty"`
	// StartTime is when the request was sent, in seconds since the scenario started.
	StartTime float64 `json:"start_time"`
	// TTFT is the time to the first content chunk (0 when not streamed).
	TTFT float64 `json:"ttft"`
	// ITL holds the gaps between successive content chunks (streamed requests only).
	ITL []float64 `json:"itl"`
	// TPOT is (E2EL − TTFT) / (OutputTokens − 1) for streamed requests with two tokens or more.
	TPOT float64 `json:"tpot"`
	// E2EL is the end-to-end latency: to the last chunk with choices, or the whole body.
	E2EL         float64 `json:"e2el"`
	PromptTokens int     `json:"prompt_tokens"`
	OutputTokens int     `json:"output_tokens"`
	// OutputTokensFrom says where OutputTokens came from: "usage", "chunks" (no usage in
	// the stream: one token per content chunk) or "none".
	OutputTokensFrom string `json:"output_tokens_from"`
	// TokensPerS is OutputTokens / E2EL.
	TokensPerS float64 `json:"tokens_per_s"`
	// Chunks counts the stream's data events before [DONE]; ContentChunks those with content.
	Chunks        int    `json:"chunks"`
	ContentChunks int    `json:"content_chunks"`
	FinishReason  string `json:"finish_reason"`
	// Done is whether the stream ended with data: [DONE].
	Done bool   `json:"done"`
	Text string `json:"generated_text"`
}

// Client sends timed requests to one OpenAI-compatible server.
type Client struct {
	// BaseURL is the server's address without /v1, e.g. http://127.0.0.1:8000.
	BaseURL string
	// APIKey, when set, goes out as Authorization: Bearer.
	APIKey string
	// Model is the model field of every request.
	Model string
	// HTTP is the client used. When nil, the first request sets NewHTTPClient(16): set it
	// before calling Do from several goroutines.
	HTTP *http.Client
	// Timeout bounds each request (0: none beyond the context).
	Timeout time.Duration
	// AllowMissingDone accepts a stream that ends without data: [DONE] after its
	// finish_reason (transformers serve never sends [DONE]); without it such a stream is an
	// error, as is one that ends before any finish_reason in every case.
	AllowMissingDone bool
	// Epoch is the zero of Result.StartTime (zero: the request's own send time).
	Epoch time.Time
}

// NewHTTPClient returns an HTTP client for benchmarking: no overall timeout (streams last),
// no compression (it would buffer events), and as many idle connections per host as
// concurrency needs.
func NewHTTPClient(concurrency int) *http.Client {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.DisableCompression = true
	t.MaxIdleConns = max(100, concurrency)
	t.MaxIdleConnsPerHost = max(16, concurrency)
	return &http.Client{Transport: t}
}

func (c *Client) http() *http.Client {
	if c.HTTP == nil {
		c.HTTP = NewHTTPClient(16)
	}
	return c.HTTP
}

// Close closes the client's idle connections.
func (c *Client) Close() {
	if c.HTTP != nil {
		c.HTTP.CloseIdleConnections()
	}
}

// Models returns the ids of GET /v1/models.
func (c *Client) Models(ctx context.Context) ([]string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.BaseURL+"/v1/models", nil)
	if err != nil {
		return nil, fmt.Errorf("bench: GET /v1/models: %w", err)
	}
	c.auth(req)
	resp, err := c.http().Do(req)
	if err != nil {
		return nil, fmt.Errorf("bench: GET %s/v1/models: %w", c.BaseURL, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return nil, fmt.Errorf("bench: GET %s/v1/models: %w", c.BaseURL, err)
	}
	if resp.StatusCode/100 != 2 {
		return nil, fmt.Errorf("bench: GET %s/v1/models: %s", c.BaseURL, statusError(resp.StatusCode, body))
	}
	var list struct {
		Data []struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	if err := json.Unmarshal(body, &list); err != nil {
		return nil, fmt.Errorf("bench: GET %s/v1/models: not a model list: %w", c.BaseURL, err)
	}
	ids := make([]string, 0, len(list.Data))
	for _, m := range list.Data {
		ids = append(ids, m.ID)
	}
	return ids, nil
}

func (c *Client) auth(req *http.Request) {
	if c.APIKey != "" {
		req.Header.Set("Authorization", "Bearer "+c.APIKey)
	}
}

// body is the JSON request body of r.
func (c *Client) body(r Request) (path string, body []byte, err error) {
	m := map[string]any{"model": c.Model, "stream": r.Stream}
	if r.Messages != nil {
		path = "/v1/chat/completions"
		m["messages"] = r.Messages
	} else {
		path = "/v1/completions"
		m["prompt"] = r.Prompt
	}
	if r.MaxTokens > 0 {
		// max_tokens, not max_completion_tokens: every server here takes it (transformers
		// serve refuses the latter).
		m["max_tokens"] = r.MaxTokens
	}
	if r.Stream {
		m["stream_options"] = map[string]any{"include_usage": true}
	}
	if r.Temperature != nil {
		m["temperature"] = *r.Temperature
	}
	if r.Seed != nil {
		m["seed"] = *r.Seed
	}
	if r.IgnoreEOS {
		m["ignore_eos"] = true
	}
	body, err = json.Marshal(m)
	if err != nil {
		return "", nil, fmt.Errorf("bench: encode request: %w", err)
	}
	return path, body, nil
}

// chunk is what a streamed chunk or a whole response may hold, chat or text completion.
type chunk struct {
	Choices []struct {
		Delta   *choiceText `json:"delta"`
		Message *choiceText `json:"message"`
		Text    *string     `json:"text"`
		// FinishReason is null until the choice ends.
		FinishReason *string `json:"finish_reason"`
	} `json:"choices"`
	Usage *struct {
		PromptTokens     int `json:"prompt_tokens"`
		CompletionTokens int `json:"completion_tokens"`
	} `json:"usage"`
	Error json.RawMessage `json:"error"`
}

type choiceText struct {
	Content          *string `json:"content"`
	ReasoningContent *string `json:"reasoning_content"`
	Reasoning        *string `json:"reasoning"`
}

// text is the output the chunk carries (content, reasoning or completion text) and whether
// it has choices, and its finish reason when one ended.
func (ch *chunk) text() (text string, choices bool, finish string) {
	var b strings.Builder
	for _, c := range ch.Choices {
		for _, t := range []*choiceText{c.Delta, c.Message} {
			if t == nil {
				continue
			}
			for _, s := range []*string{t.ReasoningContent, t.Reasoning, t.Content} {
				if s != nil {
					b.WriteString(*s)
				}
			}
		}
		if c.Text != nil {
			b.WriteString(*c.Text)
		}
		if c.FinishReason != nil && *c.FinishReason != "" {
			finish = *c.FinishReason
		}
	}
	return b.String(), len(ch.Choices) > 0, finish
}

// Do sends r and times it. It never returns an error: failures are in Result.Error.
func (c *Client) Do(ctx context.Context, r Request) Result {
	res := Result{Label: r.Label, Stream: r.Stream, ITL: []float64{}, OutputTokensFrom: "none"}
	fail := func(format string, args ...any) Result {
		res.Success = false
		res.Error = fmt.Sprintf(format, args...)
		return res
	}
	path, body, err := c.body(r)
	if err != nil {
		return fail("%v", err)
	}
	if c.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.Timeout)
		defer cancel()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.BaseURL+path, bytes.NewReader(body))
	if err != nil {
		return fail("bench: %v", err)
	}
	req.Header.Set("Content-Type", "application/json")
	if r.Stream {
		req.Header.Set("Accept", "text/event-stream")
	}
	c.auth(req)

	st := time.Now()
	if !c.Epoch.IsZero() {
		res.StartTime = st.Sub(c.Epoch).Seconds()
	}
	resp, err := c.http().Do(req)
	if err != nil {
		return fail("POST %s: %v", path, unwrapURLError(err))
	}
	defer resp.Body.Close()
	res.HTTPStatus = resp.StatusCode
	if resp.StatusCode/100 != 2 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return fail("%s", statusError(resp.StatusCode, b))
	}
	if r.Stream {
		err = c.readStream(resp.Body, st, &res)
	} else {
		err = readWhole(resp.Body, st, &res)
	}
	if err != nil {
		res.Error = err.Error()
	}
	res.finish()
	return res
}

// finish derives output tokens, TPOT, tokens/s and success from the raw measurements.
func (res *Result) finish() {
	if res.OutputTokensFrom == "none" && res.Stream {
		res.OutputTokens, res.OutputTokensFrom = res.ContentChunks, "chunks"
	}
	if res.Stream && res.OutputTokens > 1 {
		res.TPOT = (res.E2EL - res.TTFT) / float64(res.OutputTokens-1)
	}
	if res.E2EL > 0 {
		res.TokensPerS = float64(res.OutputTokens) / res.E2EL
	}
	res.Success = res.Error == ""
}

// readStream reads an event stream to its [DONE], timing the content chunks.
func (c *Client) readStream(body io.Reader, st time.Time, res *Result) error {
	sr := NewSSEReader(body)
	var text strings.Builder
	var last time.Time // the last content chunk
	var streamErr string
	for {
		ev, err := sr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			res.Text = text.String()
			return fmt.Errorf("stream broken after %d chunks: %w", res.Chunks, err)
		}
		if ev.Data == "[DONE]" {
			res.Done = true
			break
		}
		res.Chunks++
		var ch chunk
		if err := json.Unmarshal([]byte(ev.Data), &ch); err != nil {
			res.Text = text.String()
			return fmt.Errorf("chunk %d is not JSON (%v): %.200s", res.Chunks, err, ev.Data)
		}
		if len(ch.Error) > 0 && string(ch.Error) != "null" && streamErr == "" {
			streamErr = "error event in the stream: " + errorMessage(ch.Error)
		}
		if ev.Name == "error" && streamErr == "" {
			streamErr = "error event in the stream: " + ev.Data
		}
		s, choices, finish := ch.text()
		at := ev.At.Sub(st).Seconds()
		if s != "" {
			if res.ContentChunks == 0 {
				res.TTFT = at
			} else {
				res.ITL = append(res.ITL, ev.At.Sub(last).Seconds())
			}
			last = ev.At
			res.ContentChunks++
			text.WriteString(s)
		}
		if choices {
			res.E2EL = at
		}
		if finish != "" {
			res.FinishReason = finish
		}
		if ch.Usage != nil {
			res.PromptTokens = ch.Usage.PromptTokens
			res.OutputTokens, res.OutputTokensFrom = ch.Usage.CompletionTokens, "usage"
		}
	}
	// Read what follows [DONE] (nothing, normally) so that the connection is reused.
	_, _ = io.Copy(io.Discard, io.LimitReader(body, 64<<10))
	res.Text = text.String()
	if res.E2EL == 0 {
		res.E2EL = time.Since(st).Seconds()
	}
	switch {
	case streamErr != "":
		return errors.New(streamErr)
	case !res.Done && res.FinishReason == "":
		return fmt.Errorf("stream ended without data: [DONE] after %d chunks, before any finish_reason: the server dropped it", res.Chunks)
	case !res.Done && !c.AllowMissingDone:
		return fmt.Errorf("stream ended without data: [DONE] after %d chunks (finish_reason %q): "+
			"the server dropped it, or never sends [DONE] (transformers serve: pass --allow-no-done)", res.Chunks, res.FinishReason)
	case res.ContentChunks == 0:
		return errors.New("the stream carried no content: no token to time")
	}
	return nil
}

// readWhole reads an unstreamed response.
func readWhole(body io.Reader, st time.Time, res *Result) error {
	b, err := io.ReadAll(body)
	res.E2EL = time.Since(st).Seconds()
	if err != nil {
		return fmt.Errorf("reading the response: %w", err)
	}
	var ch chunk
	if err := json.Unmarshal(b, &ch); err != nil {
		return fmt.Errorf("response is not JSON (%v): %.200s", err, b)
	}
	if len(ch.Error) > 0 && string(ch.Error) != "null" {
		return errors.New(errorMessage(ch.Error))
	}
	text, choices, finish := ch.text()
	res.Text, res.FinishReason = text, finish
	if ch.Usage != nil {
		res.PromptTokens = ch.Usage.PromptTokens
		res.OutputTokens, res.OutputTokensFrom = ch.Usage.CompletionTokens, "usage"
	}
	if !choices {
		return fmt.Errorf("response has no choices: %.200s", b)
	}
	return nil
}

// statusError describes a non-2xx answer: the status and the message of an OpenAI error body
// ({"error":{"message":…}}), vLLM's older {"message":…} or FastAPI's {"detail":…}.
func statusError(status int, body []byte) string {
	msg := strings.TrimSpace(string(body))
	var e struct {
		Error   json.RawMessage `json:"error"`
		Message string          `json:"message"`
		Detail  json.RawMessage `json:"detail"`
	}
	if json.Unmarshal(body, &e) == nil {
		switch {
		case len(e.Error) > 0 && string(e.Error) != "null":
			msg = errorMessage(e.Error)
		case e.Message != "":
			msg = e.Message
		case len(e.Detail) > 0:
			msg = errorMessage(e.Detail)
		}
	}
	if len(msg) > 500 {
		msg = msg[:500] + "…"
	}
	return fmt.Sprintf("HTTP %d %s: %s", status, http.StatusText(status), msg)
}

// errorMessage is the message of an OpenAI error object, or the raw JSON (a plain string
// unquoted).
func errorMessage(raw json.RawMessage) string {
	var obj struct {
		Message string `json:"message"`
	}
	if json.Unmarshal(raw, &obj) == nil && obj.Message != "" {
		return obj.Message
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s
	}
	return string(raw)
}

// unwrapURLError drops the *url.Error wrapper (which repeats method and URL).
func unwrapURLError(err error) error {
	if u := errors.Unwrap(err); u != nil {
		return u
	}
	return err
}
