package server

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/llm"
)

// promptStream is a scripted stream that reports its prompt's token ids, as engine streams do.
type promptStream struct {
	*fakeStream
	prompt []int32
}

func (p *promptStream) PromptTokenIDs() []int32 { return p.prompt }

// batchBackend answers each prompt with the stream make returns for it (by the request's
// prompt text, or "ids:<n>" for a token-id prompt of n ids) and records the requests.
type batchBackend struct {
	fakeBackend
	mu      sync.Mutex
	reqs    []llm.Request
	streams []llm.TokenStream
}

func newBatchBackend(make func(ctx context.Context, req llm.Request) llm.TokenStream) *batchBackend {
	b := &batchBackend{}
	b.info = testInfo
	b.generateFn = func(ctx context.Context, req llm.Request) (llm.TokenStream, error) {
		s := make(ctx, req)
		b.mu.Lock()
		b.reqs = append(b.reqs, req)
		b.streams = append(b.streams, s)
		b.mu.Unlock()
		return s, nil
	}
	return b
}

// echoBackend lets each prompt's choices say which prompt and choice they are: choice j of
// prompt "P" streams "P/j" with one token per byte, then finishes with reason; its usage is
// one prompt token per byte of P.
func echoBackend(reason string, stopReason any) *batchBackend {
	return newBatchBackend(func(_ context.Context, req llm.Request) llm.TokenStream {
		name := req.Prompt
		if name == "" {
			name = fmt.Sprintf("ids:%d", len(req.PromptTokenIDs))
		}
		n := max(req.Sampling.N, 1)
		var deltas []llm.Delta
		completion := 0
		for j := range n {
			text := fmt.Sprintf("%s/%d", name, j)
			deltas = append(deltas, llm.Delta{Index: j, Text: text[:1], TokenIDs: []int32{1}})
			rest := text[1:]
			deltas = append(deltas, llm.Delta{Index: j, Text: rest, TokenIDs: make([]int32, len(rest)),
				FinishReason: reason, StopReason: stopReason})
			completion += len(text)
		}
		prompt := make([]int32, len(name))
		for i := range prompt {
			prompt[i] = int32(100 + i)
		}
		return &promptStream{scripted(llm.Usage{PromptTokens: len(name), CompletionTokens: completion}, nil, deltas...), prompt}
	})
}

func TestBatchedCompletionNonStream(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		body    string
		want    []string // choice texts by index
		prompts []string // the prompt each choice belongs to (return_token_ids)
		usage   usage
	}{
		{
			name: "two strings", body: `{"prompt":["ab","cde"]}`,
			want: []string{"ab/0", "cde/0"}, usage: usage{5, 9, 14},
		},
		{
			name: "two strings, n=2", body: `{"prompt":["ab","cde"],"n":2}`,
			want: []string{"ab/0", "ab/1", "cde/0", "cde/1"}, usage: usage{5, 18, 23},
		},
		{
			name: "three strings, n=2, echo", body: `{"prompt":["ab","cde","f"],"n":2,"echo":true}`,
			want:  []string{"abab/0", "abab/1", "cdecde/0", "cdecde/1", "ff/0", "ff/1"},
			usage: usage{6, 6 * 4 * 1, 30},
		},
		{
			name: "token-id lists", body: `{"prompt":[[1,2],[3],[4,5,6]],"return_token_ids":true}`,
			want:    []string{"ids:2/0", "ids:1/0", "ids:3/0"},
			prompts: []string{"ids:2", "ids:1", "ids:3"},
			usage:   usage{15, 21, 36},
		},
		{
			name: "one string in a list stays one request", body: `{"prompt":["ab"],"n":2}`,
			want: []string{"ab/0", "ab/1"}, usage: usage{2, 8, 10},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := echoBackend("stop", nil)
			s := newTestServer(t, b)
			rec := do(s, http.MethodPost, "/v1/completions", tt.body)
			require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
			var resp struct {
				Choices []struct {
					Index          int     `json:"index"`
					Text           string  `json:"text"`
					FinishReason   string  `json:"finish_reason"`
					StopReason     any     `json:"stop_reason"`
					PromptTokenIDs []int32 `json:"prompt_token_ids"`
				} `json:"choices"`
				Usage usage `json:"usage"`
			}
			require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &resp))
			require.Len(t, resp.Choices, len(tt.want))
			for i, c := range resp.Choices {
				require.Equal(t, i, c.Index)
				require.Equal(t, tt.want[i], c.Text)
				require.Equal(t, "stop", c.FinishReason)
				require.Nil(t, c.StopReason)
				if tt.prompts != nil {
					require.Len(t, c.PromptTokenIDs, len(tt.prompts[i]), "choice %d carries its own prompt's ids", i)
				}
			}
			require.Equal(t, tt.usage, resp.Usage)
			// One engine request per prompt, n choices each, all closed.
			b.mu.Lock()
			defer b.mu.Unlock()
			for i, req := range b.reqs {
				if len(b.reqs) > 1 {
					require.Equal(t, fmt.Sprintf("cmpl-test-%d", i), req.ID)
				} else {
					require.Equal(t, "cmpl-test", req.ID)
				}
				require.Equal(t, len(tt.want)/len(b.reqs), max(req.Sampling.N, 1))
			}
			for _, st := range b.streams {
				require.True(t, st.(*promptStream).isClosed())
			}
		})
	}
}

func TestBatchedCompletionRequests(t *testing.T) {
	t.Parallel()
	b := echoBackend("stop", nil)
	s := newTestServer(t, b)
	rec := do(s, http.MethodPost, "/v1/completions", `{"prompt":["x","yy"],"max_tokens":3,"temperature":0,"stop":["s"]}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	b.mu.Lock()
	defer b.mu.Unlock()
	require.Len(t, b.reqs, 2)
	byPrompt := map[string]llm.Request{}
	for _, r := range b.reqs {
		byPrompt[r.Prompt] = r
	}
	for i, p := range []string{"x", "yy"} {
		r := byPrompt[p]
		require.Equal(t, fmt.Sprintf("cmpl-test-%d", i), r.ID)
		require.Equal(t, llm.SamplingParams{MaxTokens: 3, N: 1, Temperature: llm.Ptr(0.0), Stop: []string{"s"}}, r.Sampling)
	}
}

// gatedStream yields its deltas, each after its gate (if any) is closed; after yielding delta i
// it closes opens[i] (if any).
func gatedStream(ctx context.Context, deltas []llm.Delta, gates, opens []chan struct{}) *fakeStream {
	i := 0
	return newFakeStream(func() (llm.Delta, error) {
		if i > 0 && i-1 < len(opens) && opens[i-1] != nil {
			close(opens[i-1])
		}
		if i >= len(deltas) {
			return llm.Delta{}, io.EOF
		}
		if i < len(gates) && gates[i] != nil {
			select {
			case <-gates[i]:
			case <-ctx.Done():
				return llm.Delta{}, ctx.Err()
			}
		}
		i++
		return deltas[i-1], nil
	}, llm.Usage{PromptTokens: 1, CompletionTokens: len(deltas)})
}

func TestBatchedCompletionStreamInterleaves(t *testing.T) {
	t.Parallel()
	// Prompt "b" speaks first, then "a" (which waits for it) finishes, then "b" finishes: the
	// chunks go out in that order, numbered by prompt.
	bFirst, aDone := make(chan struct{}), make(chan struct{})
	b := newBatchBackend(func(ctx context.Context, req llm.Request) llm.TokenStream {
		if req.Prompt == "a" {
			return gatedStream(ctx, []llm.Delta{{Text: "A", TokenIDs: []int32{1}, FinishReason: "stop", StopReason: "x"}},
				[]chan struct{}{bFirst}, []chan struct{}{aDone})
		}
		return gatedStream(ctx, []llm.Delta{{Text: "B1", TokenIDs: []int32{1}}, {Text: "B2", TokenIDs: []int32{2}, FinishReason: "length"}},
			[]chan struct{}{nil, aDone}, []chan struct{}{bFirst})
	})
	s := newTestServer(t, b)
	rec := do(s, http.MethodPost, "/v1/completions",
		`{"prompt":["a","b"],"stream":true,"echo":true,"stream_options":{"include_usage":true}}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	head := `data: {"id":"cmpl-test","object":"text_completion","created":1700000000,"model":"test-model","choices":`
	want := head + `[{"index":1,"text":"bB1","logprobs":null,"finish_reason":null,"stop_reason":null}]}` + "\n\n" +
		head + `[{"index":0,"text":"aA","logprobs":null,"finish_reason":"stop","stop_reason":"x"}]}` + "\n\n" +
		head + `[{"index":1,"text":"B2","logprobs":null,"finish_reason":"length","stop_reason":null}]}` + "\n\n" +
		head + `[],"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5},"system_fingerprint":"govllm-fake"}` + "\n\n" +
		doneEvent
	require.Equal(t, want, rec.Body.String())
}

// streamEvents splits an SSE body into its JSON events, checking it ends with [DONE].
func streamEvents(t *testing.T, body string) []string {
	t.Helper()
	events := strings.Split(strings.TrimSuffix(body, "\n\n"), "\n\n")
	require.Equal(t, "data: [DONE]", events[len(events)-1], body)
	out := make([]string, 0, len(events)-1)
	for _, ev := range events[:len(events)-1] {
		out = append(out, strings.TrimPrefix(ev, "data: "))
	}
	return out
}

func TestBatchedCompletionStreamN(t *testing.T) {
	t.Parallel()
	s := newTestServer(t, echoBackend("length", nil))
	rec := do(s, http.MethodPost, "/v1/completions", `{"prompt":["ab","c"],"n":2,"stream":true,"echo":true,"return_token_ids":true}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	texts := map[int]string{}
	finishes := map[int]int{}
	promptIDs := map[int][]int32{}
	for _, ev := range streamEvents(t, rec.Body.String()) {
		var c textCompletion
		require.NoError(t, json.Unmarshal([]byte(ev), &c))
		require.Len(t, c.Choices, 1)
		ch := c.Choices[0]
		texts[ch.Index] += ch.Text
		if ch.PromptTokenIDs != nil {
			require.NotContains(t, promptIDs, ch.Index, "prompt ids once per choice")
			promptIDs[ch.Index] = *ch.PromptTokenIDs
		}
		if ch.FinishReason != nil {
			finishes[ch.Index]++
			require.Equal(t, "length", *ch.FinishReason)
		}
	}
	require.Equal(t, map[int]string{0: "abab/0", 1: "abab/1", 2: "cc/0", 3: "cc/1"}, texts)
	require.Equal(t, map[int]int{0: 1, 1: 1, 2: 1, 3: 1}, finishes)
	require.Equal(t, map[int][]int32{0: {100, 101}, 1: {100, 101}, 2: {100}, 3: {100}}, promptIDs)
}

// failingBackend starts prompt "bad" with err (from Generate when atStart, else from its first
// Recv); the other prompts block until their context ends.
func failingBackend(err error, atStart bool) *batchBackend {
	b := newBatchBackend(func(ctx context.Context, req llm.Request) llm.TokenStream {
		if req.Prompt == "bad" {
			return scripted(llm.Usage{}, err)
		}
		return newTickStream(ctx, time.Hour, 0, "t")
	})
	if atStart {
		inner := b.generateFn
		b.generateFn = func(ctx context.Context, req llm.Request) (llm.TokenStream, error) {
			if req.Prompt == "bad" {
				return nil, err
			}
			return inner(ctx, req)
		}
	}
	return b
}

func TestBatchedCompletionOnePromptFails(t *testing.T) {
	t.Parallel()
	tooLong := &llm.RequestError{Status: 400, Type: "BadRequestError", Param: "max_tokens", Message: "too long"}
	for _, atStart := range []bool{true, false} {
		for _, stream := range []bool{false, true} {
			t.Run(fmt.Sprintf("at start=%v/stream=%v", atStart, stream), func(t *testing.T) {
				t.Parallel()
				b := failingBackend(tooLong, atStart)
				s := newTestServer(t, b)
				rec := do(s, http.MethodPost, "/v1/completions", fmt.Sprintf(`{"prompt":["ok","bad","ok2"],"stream":%v}`, stream))
				requireError(t, rec, http.StatusBadRequest, "BadRequestError", "max_tokens")
				b.mu.Lock()
				defer b.mu.Unlock()
				for _, st := range b.streams {
					switch st := st.(type) {
					case *tickStream:
						require.True(t, st.isClosed(), "the other prompts' requests are closed")
					case *fakeStream:
						require.True(t, st.isClosed())
					}
				}
			})
		}
	}
}

func TestBatchedCompletionClientGone(t *testing.T) {
	t.Parallel()
	b := newBatchBackend(func(ctx context.Context, _ llm.Request) llm.TokenStream {
		return newTickStream(ctx, 5*time.Millisecond, 0, "t")
	})
	s := newTestServer(t, b)
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		serve(s, newRequest(http.MethodPost, "/v1/completions", `{"prompt":["a","b","c"],"stream":true,"max_tokens":1000}`).WithContext(ctx))
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the handler did not return after the client left")
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	require.Len(t, b.streams, 3)
	for _, st := range b.streams {
		require.True(t, st.(*tickStream).isClosed(), "every prompt's request is closed")
	}
}

func TestBatchedCompletionTimeoutAborts(t *testing.T) {
	t.Parallel()
	for _, abortable := range []bool{false, true} {
		t.Run(fmt.Sprintf("abortable=%v", abortable), func(t *testing.T) {
			t.Parallel()
			s := newTestServer(t, tickBackend(10*time.Millisecond, 0, abortable), func(c *Config) { c.RequestTimeout = 150 * time.Millisecond })
			s.now = time.Now
			rec := do(s, http.MethodPost, "/v1/completions", `{"prompt":["a","b"],"n":2,"max_tokens":1000}`)
			require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
			var resp textCompletion
			require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &resp))
			require.Len(t, resp.Choices, 4)
			for i, c := range resp.Choices {
				require.Equal(t, i, c.Index)
				require.Equal(t, "abort", *c.FinishReason)
			}
		})
	}
}

func TestStopReason(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		reason any
		want   string // JSON
	}{
		{name: "stop string", reason: "END", want: `"END"`},
		{name: "stop token id", reason: int32(42), want: `42`},
		{name: "EOS", reason: nil, want: `null`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			deltas := func() []llm.Delta {
				return []llm.Delta{{Text: "hi", TokenIDs: []int32{1}}, {Text: "!", TokenIDs: []int32{2}, FinishReason: "stop", StopReason: tt.reason}}
			}
			s := newTestServer(t, &fakeBackend{info: testInfo, generateFn: func(context.Context, llm.Request) (llm.TokenStream, error) {
				return scripted(llm.Usage{PromptTokens: 1, CompletionTokens: 2}, nil, deltas()...), nil
			}})
			// Completions, not streamed and streamed.
			rec := do(s, http.MethodPost, "/v1/completions", `{"prompt":"p"}`)
			require.Equal(t, http.StatusOK, rec.Code)
			require.Contains(t, rec.Body.String(), `"finish_reason":"stop","stop_reason":`+tt.want+`}`)
			rec = do(s, http.MethodPost, "/v1/completions", `{"prompt":"p","stream":true}`)
			events := streamEvents(t, rec.Body.String())
			require.Contains(t, events[0], `"finish_reason":null,"stop_reason":null}`)
			require.Contains(t, events[1], `"finish_reason":"stop","stop_reason":`+tt.want+`}`)
			// Chat, not streamed and streamed: only the finish chunk has stop_reason.
			rec = do(s, http.MethodPost, "/v1/chat/completions", hello+`}`)
			require.Equal(t, http.StatusOK, rec.Code)
			require.Contains(t, rec.Body.String(), `"finish_reason":"stop","stop_reason":`+tt.want+`}`)
			rec = do(s, http.MethodPost, "/v1/chat/completions", hello+`,"stream":true}`)
			events = streamEvents(t, rec.Body.String())
			require.Len(t, events, 4) // role, "hi", "!", finish
			for _, ev := range events[:3] {
				require.NotContains(t, ev, "stop_reason")
			}
			require.Contains(t, events[3], `"finish_reason":"stop","stop_reason":`+tt.want+`}`)
		})
	}
}

func TestContinuousUsage(t *testing.T) {
	t.Parallel()
	const cont = `"stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":true}`
	tests := []struct {
		name, path, body string
		// want is, per chunk with choices, "index:prompt/completion"; the usage chunk follows.
		want      []string
		wantFinal usage
	}{
		{
			name: "completions", path: "/v1/completions", body: `{"prompt":"abc",` + cont + `}`,
			want:      []string{"0:3/1", "0:3/5"},
			wantFinal: usage{3, 5, 8},
		},
		{
			name: "completions, several prompts", path: "/v1/completions", body: `{"prompt":["abc","de"],` + cont + `}`,
			want:      []string{"0:3/1", "0:3/5", "1:2/1", "1:2/4"},
			wantFinal: usage{5, 9, 14},
		},
		{
			name: "chat, n=2", path: "/v1/chat/completions", body: `{"messages":[{"role":"user","content":"x"}],"n":2,` + cont + `}`,
			// The fake names a chat prompt "ids:0": 5 prompt ids; each choice streams 1 then 6
			// tokens; the role chunk counts none, the finish chunk repeats the count.
			want:      []string{"0:5/0", "0:5/1", "0:5/7", "0:5/7", "1:5/0", "1:5/1", "1:5/7", "1:5/7"},
			wantFinal: usage{5, 14, 19},
		},
		{
			name: "without include_usage it is ignored", path: "/v1/completions",
			body: `{"prompt":"abc","stream":true,"stream_options":{"continuous_usage_stats":true}}`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := echoBackend("stop", nil)
			s := newTestServer(t, b)
			rec := do(s, http.MethodPost, tt.path, tt.body)
			require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
			got := map[int][]string{}
			var final *usage
			for _, ev := range streamEvents(t, rec.Body.String()) {
				var c struct {
					Choices []struct {
						Index int `json:"index"`
					} `json:"choices"`
					Usage *usage `json:"usage"`
				}
				require.NoError(t, json.Unmarshal([]byte(ev), &c))
				if len(c.Choices) == 0 {
					final = c.Usage
					continue
				}
				if tt.want == nil {
					require.Nil(t, c.Usage, ev)
					continue
				}
				require.NotNil(t, c.Usage, ev)
				require.Equal(t, c.Usage.PromptTokens+c.Usage.CompletionTokens, c.Usage.TotalTokens)
				i := c.Choices[0].Index
				got[i] = append(got[i], fmt.Sprintf("%d:%d/%d", i, c.Usage.PromptTokens, c.Usage.CompletionTokens))
			}
			if tt.want == nil {
				require.Nil(t, final)
				return
			}
			var flat []string
			for i := 0; i < len(got); i++ {
				flat = append(flat, got[i]...)
			}
			require.Equal(t, tt.want, flat)
			require.NotNil(t, final)
			require.Equal(t, tt.wantFinal, *final)
		})
	}
}

// tokenizerBackend is a batchBackend that detokenizes (llm.Tokenizer): id k decodes to "<k>".
type tokenizerBackend struct{ *batchBackend }

func (tokenizerBackend) Tokenize(context.Context, llm.TokenizeRequest) (llm.TokenizeResult, error) {
	return llm.TokenizeResult{}, fmt.Errorf("not used")
}

func (tokenizerBackend) Detokenize(_ context.Context, ids []int32) (string, error) {
	var b strings.Builder
	for _, id := range ids {
		fmt.Fprintf(&b, "<%d>", id)
	}
	return b.String(), nil
}

func TestEchoTokenIDPrompts(t *testing.T) {
	t.Parallel()
	s := newTestServer(t, tokenizerBackend{echoBackend("stop", nil)})
	for _, body := range []string{`{"prompt":[[1,2],[3]],"echo":true}`, `{"prompt":[[1,2],[3]],"echo":true,"stream":true}`} {
		rec := do(s, http.MethodPost, "/v1/completions", body)
		require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
		texts := map[int]string{}
		if strings.Contains(body, "stream") {
			for _, ev := range streamEvents(t, rec.Body.String()) {
				var c textCompletion
				require.NoError(t, json.Unmarshal([]byte(ev), &c))
				texts[c.Choices[0].Index] += c.Choices[0].Text
			}
		} else {
			var c textCompletion
			require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &c))
			for _, ch := range c.Choices {
				texts[ch.Index] = ch.Text
			}
		}
		require.Equal(t, map[int]string{0: "<1><2>ids:2/0", 1: "<3>ids:1/0"}, texts, body)
	}
	rec := do(s, http.MethodPost, "/v1/completions", `{"prompt":[5,6],"echo":true}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	require.Contains(t, rec.Body.String(), `"text":"<5><6>ids:2/0"`)
}
