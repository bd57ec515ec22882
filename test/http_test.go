package test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/test/internal/govtest"
)

type chunk struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Choices []struct {
		Index int `json:"index"`
		Delta struct {
			Role    *string `json:"role"`
			Content *string `json:"content"`
		} `json:"delta"`
		FinishReason *string `json:"finish_reason"`
	} `json:"choices"`
	Usage *struct {
		PromptTokens     int `json:"prompt_tokens"`
		CompletionTokens int `json:"completion_tokens"`
		TotalTokens      int `json:"total_tokens"`
	} `json:"usage"`
}

// sse posts body and returns the data lines of the event stream, [DONE] included.
func sse(t *testing.T, ctx context.Context, body string) []string {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, binURL+"/v1/chat/completions", strings.NewReader(body))
	require.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "text/event-stream", resp.Header.Get("Content-Type"))
	return govtest.SSEData(t, resp.Body)
}

func TestHTTPStreamingCapitalOfFrance(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	lines := sse(t, ctx, `{"model":"SmolLM2-135M-Instruct","messages":[{"role":"user","content":"What is the capital of France?"}],
		"stream":true,"max_tokens":40,"temperature":0,"stream_options":{"include_usage":true}}`)
	require.Equal(t, "[DONE]", lines[len(lines)-1])
	var text strings.Builder
	var id string
	var finish string
	var usageSeen bool
	for i, l := range lines[:len(lines)-1] {
		var c chunk
		require.NoError(t, json.Unmarshal([]byte(l), &c), l)
		require.Equal(t, "chat.completion.chunk", c.Object)
		if id == "" {
			id = c.ID
		}
		require.Equal(t, id, c.ID, "one id for the whole stream")
		if c.Usage != nil {
			require.Empty(t, c.Choices, "the usage chunk has choices: []")
			require.Equal(t, c.Usage.PromptTokens+c.Usage.CompletionTokens, c.Usage.TotalTokens)
			require.Greater(t, c.Usage.CompletionTokens, 0)
			usageSeen = true
			continue
		}
		require.Len(t, c.Choices, 1)
		ch := c.Choices[0]
		if i == 0 {
			require.NotNil(t, ch.Delta.Role, "the first chunk carries the role")
			require.Equal(t, "assistant", *ch.Delta.Role)
		}
		if ch.Delta.Content != nil {
			text.WriteString(*ch.Delta.Content)
		}
		if ch.FinishReason != nil {
			require.Nil(t, ch.Delta.Content, "finish_reason comes in a chunk of its own")
			finish = *ch.FinishReason
		}
	}
	require.True(t, usageSeen)
	require.Equal(t, "stop", finish)
	require.Contains(t, text.String(), "Paris")
}

func TestHTTPNonStreaming(t *testing.T) {
	body := `{"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"What is the capital of France?"}],"max_tokens":5,"temperature":0}`
	resp, err := http.Post(binURL+"/v1/chat/completions", "application/json", strings.NewReader(body))
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	var out struct {
		Object  string `json:"object"`
		Choices []struct {
			Message struct {
				Role    string `json:"role"`
				Content string `json:"content"`
			} `json:"message"`
			FinishReason string `json:"finish_reason"`
		} `json:"choices"`
		Usage struct {
			CompletionTokens int `json:"completion_tokens"`
		} `json:"usage"`
	}
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&out))
	require.Equal(t, "chat.completion", out.Object)
	require.Len(t, out.Choices, 1)
	require.Equal(t, "assistant", out.Choices[0].Message.Role)
	require.NotEmpty(t, out.Choices[0].Message.Content)
	require.Equal(t, "length", out.Choices[0].FinishReason)
	require.Equal(t, 5, out.Usage.CompletionTokens)
}

func TestHTTPModelsAndHealth(t *testing.T) {
	resp, err := http.Get(binURL + "/v1/models")
	require.NoError(t, err)
	defer resp.Body.Close()
	var models struct {
		Data []struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&models))
	require.Len(t, models.Data, 1)
	require.Equal(t, "SmolLM2-135M-Instruct", models.Data[0].ID)

	resp, err = http.Get(binURL + "/health")
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
}

func TestHTTPBadRequestKeepsServing(t *testing.T) {
	for _, body := range []string{`{"messages":`, `{"messages":[],"max_tokens":1}`, `{"messages":[{"role":"user","content":"hi"}],"temperature":-1}`} {
		resp, err := http.Post(binURL+"/v1/chat/completions", "application/json", strings.NewReader(body))
		require.NoError(t, err)
		var e struct {
			Error struct {
				Message string `json:"message"`
				Type    string `json:"type"`
			} `json:"error"`
		}
		require.NoError(t, json.NewDecoder(resp.Body).Decode(&e))
		resp.Body.Close()
		require.Equal(t, http.StatusBadRequest, resp.StatusCode, body)
		require.NotEmpty(t, e.Error.Message)
	}
	TestHTTPModelsAndHealth(t)
}

func TestHTTPClientDisconnectMidStream(t *testing.T) {
	// A client that goes away mid-stream must not wedge the server: the next request is served.
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, binURL+"/v1/chat/completions",
		strings.NewReader(`{"messages":[{"role":"user","content":"Write a long story about a dragon."}],"stream":true,"max_tokens":400}`))
	require.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	br := bufio.NewReader(resp.Body)
	for i := 0; i < 3; i++ {
		_, err := br.ReadString('\n')
		require.NoError(t, err)
	}
	cancel()
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	TestHTTPNonStreaming(t)
}

// TestOpenAIClient drives the transformers backend through the official OpenAI Go client.
func TestOpenAIClient(t *testing.T) {
	govtest.RunOpenAIClientTests(t, binURL, "SmolLM2-135M-Instruct")
}

// TestTransformersSamplingFields: every sampling field the transformers backend applies per request
// (penalties, min_p, min_tokens, logprobs) is accepted, and logprobs come back shaped as on vLLM.
func TestTransformersSamplingFields(t *testing.T) {
	for _, field := range []string{`"min_p":0.1`, `"presence_penalty":0.5`, `"frequency_penalty":0.5`, `"repetition_penalty":1.2`, `"min_tokens":2`} {
		body := `{"messages":[{"role":"user","content":"hi"}],"max_tokens":4,` + field + `}`
		resp, err := http.Post(binURL+"/v1/chat/completions", "application/json", strings.NewReader(body))
		require.NoError(t, err)
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode, body)
	}

	body := `{"messages":[{"role":"user","content":"What is the capital of France?"}],"temperature":0,"max_tokens":6,
		"ignore_eos":true,"logprobs":true,"top_logprobs":2}`
	resp, err := http.Post(binURL+"/v1/chat/completions", "application/json", strings.NewReader(body))
	require.NoError(t, err)
	defer resp.Body.Close()
	var c govtest.ChatLogprobs
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&c))
	govtest.RequireGreedyLogprobs(t, c, 6, 1e-6)
}

// TestContextLengthError: a request that does not fit the context gets a 400 with the numbers.
func TestContextLengthError(t *testing.T) {
	var models struct {
		Data []struct {
			MaxModelLen int `json:"max_model_len"`
		} `json:"data"`
	}
	resp, err := http.Get(binURL + "/v1/models")
	require.NoError(t, err)
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&models))
	resp.Body.Close()
	maxLen := models.Data[0].MaxModelLen
	for _, path := range []string{"/v1/chat/completions", "/v1/completions"} {
		body := fmt.Sprintf(`{"messages":[{"role":"user","content":"What is the capital of France?"}],"prompt":"The capital of France is","max_tokens":%d}`, maxLen-2)
		resp, err := http.Post(binURL+path, "application/json", strings.NewReader(body))
		require.NoError(t, err)
		var e struct {
			Error struct {
				Message string `json:"message"`
				Param   string `json:"param"`
			} `json:"error"`
		}
		require.NoError(t, json.NewDecoder(resp.Body).Decode(&e))
		resp.Body.Close()
		require.Equal(t, http.StatusBadRequest, resp.StatusCode, path)
		require.Equal(t, "max_tokens", e.Error.Param)
		require.Contains(t, e.Error.Message, fmt.Sprintf("maximum context length is %d tokens", maxLen))
	}
}
