package server

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"math"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/llm"
)

// fakeEmbedder is a fakeBackend that also embeds, through embedFn.
type fakeEmbedder struct {
	fakeBackend
	embedFn func(ctx context.Context, req llm.EmbedRequest) (llm.EmbedResult, error)
}

func (f *fakeEmbedder) Embed(ctx context.Context, req llm.EmbedRequest) (llm.EmbedResult, error) {
	return f.embedFn(ctx, req)
}

var poolingInfo = llm.ModelInfo{ID: testModel, Root: "/models/test", MaxModelLen: 128, Backend: "fake",
	Runner: llm.RunnerPooling}

// vectorsOf is a deterministic embedding per input: [index, tokens-or-text length, 0.5].
func vectorsOf(req llm.EmbedRequest) llm.EmbedResult {
	var res llm.EmbedResult
	for i, in := range req.Inputs {
		n := len(in.TokenIDs) + len(in.Text)
		res.Vectors = append(res.Vectors, []float32{float32(i), float32(n), 0.5})
		res.PromptTokens += n
	}
	return res
}

// recordingEmbedder answers with vectorsOf and records each request.
func recordingEmbedder(info llm.ModelInfo, got *llm.EmbedRequest) *fakeEmbedder {
	var mu sync.Mutex
	return &fakeEmbedder{fakeBackend: fakeBackend{info: info}, embedFn: func(_ context.Context, req llm.EmbedRequest) (llm.EmbedResult, error) {
		mu.Lock()
		defer mu.Unlock()
		if got != nil {
			*got = req
		}
		return vectorsOf(req), nil
	}}
}

func TestEmbeddingsInputs(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		body string
		want llm.EmbedRequest
	}{
		{"string", `{"model":"test-model","input":"hello"}`,
			llm.EmbedRequest{Inputs: []llm.EmbedInput{{Text: "hello"}}}},
		{"strings", `{"input":["a","bc"],"user":"u","encoding_format":"float"}`,
			llm.EmbedRequest{Inputs: []llm.EmbedInput{{Text: "a"}, {Text: "bc"}}}},
		{"token ids", `{"input":[5,6,7]}`,
			llm.EmbedRequest{Inputs: []llm.EmbedInput{{TokenIDs: []int32{5, 6, 7}}}}},
		{"token-id lists", `{"input":[[1],[2,3]],"dimensions":16}`,
			llm.EmbedRequest{Inputs: []llm.EmbedInput{{TokenIDs: []int32{1}}, {TokenIDs: []int32{2, 3}}}, Dimensions: llm.Ptr(16)}},
		{"nulls and default add_special_tokens", `{"input":"x","truncate_prompt_tokens":null,"add_special_tokens":true,"dimensions":null}`,
			llm.EmbedRequest{Inputs: []llm.EmbedInput{{Text: "x"}}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var got llm.EmbedRequest
			s := newTestServer(t, recordingEmbedder(poolingInfo, &got))
			rec := do(s, http.MethodPost, "/v1/embeddings", tt.body)
			require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
			tt.want.ID = "embd-test"
			require.Equal(t, tt.want, got)

			var resp struct {
				ID      string `json:"id"`
				Object  string `json:"object"`
				Created int64  `json:"created"`
				Model   string `json:"model"`
				Data    []struct {
					Index     int       `json:"index"`
					Object    string    `json:"object"`
					Embedding []float32 `json:"embedding"`
				} `json:"data"`
				Usage map[string]int `json:"usage"`
			}
			require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &resp))
			want := vectorsOf(got)
			require.Equal(t, "embd-test", resp.ID)
			require.Equal(t, "list", resp.Object)
			require.Equal(t, int64(testCreated), resp.Created)
			require.Equal(t, testModel, resp.Model)
			require.Len(t, resp.Data, len(want.Vectors))
			for i, d := range resp.Data {
				require.Equal(t, i, d.Index)
				require.Equal(t, "embedding", d.Object)
				require.Equal(t, want.Vectors[i], d.Embedding)
			}
			require.Equal(t, map[string]int{"prompt_tokens": want.PromptTokens, "total_tokens": want.PromptTokens}, resp.Usage)
		})
	}
}

func TestEmbeddingsBase64(t *testing.T) {
	t.Parallel()
	vec := []float32{1.5, -2.25, float32(math.Pi), 1e-7}
	b := &fakeEmbedder{fakeBackend: fakeBackend{info: poolingInfo}, embedFn: func(context.Context, llm.EmbedRequest) (llm.EmbedResult, error) {
		return llm.EmbedResult{Vectors: [][]float32{vec}, PromptTokens: 3}, nil
	}}
	s := newTestServer(t, b)
	rec := do(s, http.MethodPost, "/v1/embeddings", `{"input":"x","encoding_format":"base64"}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	var resp struct {
		Data []struct {
			Embedding string `json:"embedding"`
		} `json:"data"`
	}
	require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &resp))
	raw, err := base64.StdEncoding.DecodeString(resp.Data[0].Embedding)
	require.NoError(t, err)
	require.Len(t, raw, 4*len(vec))
	for i, f := range vec {
		require.Equal(t, math.Float32bits(f), binary.LittleEndian.Uint32(raw[4*i:]), "value %d", i)
	}
}

func TestEmbeddingsBadRequests(t *testing.T) {
	t.Parallel()
	many := "[" + strings.TrimSuffix(strings.Repeat(`"a",`, maxEmbeddingInputs+1), ",") + "]"
	tests := []struct {
		name, body, param string
		status            int
	}{
		{"no input", `{"model":"test-model"}`, "input", 400},
		{"null input", `{"input":null}`, "input", 400},
		{"empty string", `{"input":""}`, "input", 400},
		{"empty array", `{"input":[]}`, "input", 400},
		{"empty string in array", `{"input":["a",""]}`, "input", 400},
		{"empty token list", `{"input":[[1],[]]}`, "input", 400},
		{"number", `{"input":3}`, "input", 400},
		{"object", `{"input":{"text":"a"}}`, "input", 400},
		{"mixed kinds", `{"input":["a",[1]]}`, "input", 400},
		{"mixed ids", `{"input":[1,"a"]}`, "input", 400},
		{"negative id", `{"input":[1,-2]}`, "input", 400},
		{"fractional id", `{"input":[[1.5]]}`, "input", 400},
		{"too many inputs", `{"input":` + many + `}`, "input", 400},
		{"encoding_format", `{"input":"a","encoding_format":"int8"}`, "encoding_format", 400},
		{"encoding_format type", `{"input":"a","encoding_format":1}`, "encoding_format", 400},
		{"dimensions zero", `{"input":"a","dimensions":0}`, "dimensions", 400},
		{"dimensions type", `{"input":"a","dimensions":"8"}`, "dimensions", 400},
		{"truncate_prompt_tokens", `{"input":"a","truncate_prompt_tokens":4}`, "truncate_prompt_tokens", 400},
		{"messages", `{"messages":[{"role":"user","content":"a"}]}`, "messages", 400},
		{"use_activation", `{"input":"a","use_activation":false}`, "use_activation", 400},
		{"add_special_tokens false", `{"input":"a","add_special_tokens":false}`, "add_special_tokens", 400},
		{"unknown model", `{"model":"other","input":"a"}`, "model", 404},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := &fakeEmbedder{fakeBackend: fakeBackend{info: poolingInfo}, embedFn: func(context.Context, llm.EmbedRequest) (llm.EmbedResult, error) {
				t.Error("a bad request reached the backend")
				return llm.EmbedResult{}, nil
			}}
			s := newTestServer(t, b)
			rec := do(s, http.MethodPost, "/v1/embeddings", tt.body)
			typ := "BadRequestError"
			if tt.status == 404 {
				typ = "NotFoundError"
			}
			requireError(t, rec, tt.status, typ, tt.param)
		})
	}
}

func TestEmbeddingsBackendErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		err    error
		status int
		typ    string
		param  string
	}{
		{"too long (the backend's 400)", &llm.RequestError{Status: 400, Type: "BadRequestError", Param: "input",
			Message: "This model's maximum context length is 128 tokens. However, your prompt contains 300 input tokens"},
			400, "BadRequestError", "input"},
		{"unsupported dimensions", &llm.RequestError{Status: 400, Type: "BadRequestError", Param: "dimensions",
			Message: "Model 'm' does not support Matryoshka embeddings"}, 400, "BadRequestError", "dimensions"},
		{"engine dead", llm.ErrEngineDead, 503, "ServiceUnavailableError", ""},
		{"internal", &llm.RequestError{Status: 500, Type: "InternalServerError", Message: "boom"}, 500, "InternalServerError", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := &fakeEmbedder{fakeBackend: fakeBackend{info: poolingInfo}, embedFn: func(context.Context, llm.EmbedRequest) (llm.EmbedResult, error) {
				return llm.EmbedResult{}, tt.err
			}}
			rec := do(newTestServer(t, b), http.MethodPost, "/v1/embeddings", `{"input":"a"}`)
			requireError(t, rec, tt.status, tt.typ, tt.param)
		})
	}
	t.Run("wrong vector count is a 500", func(t *testing.T) {
		t.Parallel()
		b := &fakeEmbedder{fakeBackend: fakeBackend{info: poolingInfo}, embedFn: func(context.Context, llm.EmbedRequest) (llm.EmbedResult, error) {
			return llm.EmbedResult{Vectors: [][]float32{{1}}}, nil
		}}
		rec := do(newTestServer(t, b), http.MethodPost, "/v1/embeddings", `{"input":["a","b"]}`)
		requireError(t, rec, 500, "InternalServerError", "")
	})
}

func TestEmbeddingsRunner(t *testing.T) {
	t.Parallel()
	t.Run("generate runner refuses embeddings naming --runner pooling", func(t *testing.T) {
		t.Parallel()
		info := poolingInfo
		info.Runner = llm.RunnerGenerate
		rec := do(newTestServer(t, recordingEmbedder(info, nil)), http.MethodPost, "/v1/embeddings", `{"input":"a"}`)
		require.Contains(t, requireError(t, rec, 400, "BadRequestError", "model"), "--runner pooling")
	})
	t.Run("a backend that does not say is the generate runner", func(t *testing.T) {
		t.Parallel()
		info := poolingInfo
		info.Runner = ""
		rec := do(newTestServer(t, recordingEmbedder(info, nil)), http.MethodPost, "/v1/embeddings", `{"input":"a"}`)
		require.Contains(t, requireError(t, rec, 400, "BadRequestError", "model"), "--runner pooling")
	})
	t.Run("a backend without Embed is 501", func(t *testing.T) {
		t.Parallel()
		b := &fakeBackend{info: poolingInfo}
		rec := do(newTestServer(t, b), http.MethodPost, "/v1/embeddings", `{"input":"a"}`)
		requireError(t, rec, 501, "NotImplementedError", "")
	})
	for _, path := range []string{"/v1/chat/completions", "/v1/completions"} {
		t.Run("pooling runner refuses "+path, func(t *testing.T) {
			t.Parallel()
			b := recordingEmbedder(poolingInfo, nil)
			b.generateFn = func(context.Context, llm.Request) (llm.TokenStream, error) {
				t.Error("generation reached a pooling backend")
				return nil, llm.ErrClosed
			}
			body := `{"prompt":"a"}`
			if strings.Contains(path, "chat") {
				body = `{"messages":[{"role":"user","content":"a"}]}`
			}
			rec := do(newTestServer(t, b), http.MethodPost, path, body)
			require.Contains(t, requireError(t, rec, 400, "BadRequestError", "model"), "--runner")
		})
	}
}

func TestEmbeddingsCancelAndAdmission(t *testing.T) {
	t.Parallel()
	t.Run("client gone cancels the embedding", func(t *testing.T) {
		t.Parallel()
		started, ended := make(chan struct{}), make(chan error, 1)
		b := &fakeEmbedder{fakeBackend: fakeBackend{info: poolingInfo}, embedFn: func(ctx context.Context, _ llm.EmbedRequest) (llm.EmbedResult, error) {
			close(started)
			<-ctx.Done()
			ended <- ctx.Err()
			return llm.EmbedResult{}, ctx.Err()
		}}
		s := newTestServer(t, b)
		ctx, cancel := context.WithCancel(context.Background())
		req := newRequest(http.MethodPost, "/v1/embeddings", `{"input":"a"}`).WithContext(ctx)
		done := make(chan struct{})
		go func() { defer close(done); serve(s, req) }()
		<-started
		cancel()
		require.ErrorIs(t, <-ended, context.Canceled)
		<-done
	})
	t.Run("request timeout is a 503", func(t *testing.T) {
		t.Parallel()
		b := &fakeEmbedder{fakeBackend: fakeBackend{info: poolingInfo}, embedFn: func(ctx context.Context, _ llm.EmbedRequest) (llm.EmbedResult, error) {
			<-ctx.Done()
			return llm.EmbedResult{}, ctx.Err()
		}}
		s := newTestServer(t, b, func(c *Config) { c.RequestTimeout = 50 * time.Millisecond })
		s.now = time.Now
		rec := do(s, http.MethodPost, "/v1/embeddings", `{"input":"a"}`)
		requireError(t, rec, 503, "ServiceUnavailableError", "")
	})
	t.Run("a full queue is a 429", func(t *testing.T) {
		t.Parallel()
		release, started := make(chan struct{}), make(chan struct{}, 1)
		b := &fakeEmbedder{fakeBackend: fakeBackend{info: poolingInfo}, embedFn: func(ctx context.Context, req llm.EmbedRequest) (llm.EmbedResult, error) {
			started <- struct{}{}
			<-release
			return vectorsOf(req), nil
		}}
		s := newTestServer(t, b, func(c *Config) { c.MaxConcurrent, c.MaxQueue = 1, 0 })
		first := make(chan int)
		go func() { first <- do(s, http.MethodPost, "/v1/embeddings", `{"input":"a"}`).Code }()
		<-started
		rec := do(s, http.MethodPost, "/v1/embeddings", `{"input":"b"}`)
		requireError(t, rec, 429, "RateLimitError", "")
		close(release)
		require.Equal(t, http.StatusOK, <-first)
	})
}
