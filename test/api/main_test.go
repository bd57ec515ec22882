// Package api holds the end-to-end tests of the API breadth routes — batched completions,
// /tokenize and /detokenize, the Responses API, Anthropic's Messages API, request ids and the
// vLLM extensions of the chat and completions routes — through the official clients (the openai
// and anthropic Python SDKs, openai-go) against the govllm binary on the default model, on both
// backends: vLLM (when the venv has it) and transformers. Each backend's server starts once per
// test binary with an API key, hermes auto tool choice and the shipped tool template.
package api

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/govllm/govllm/test/internal/govtest"
)

// server is one govllm binary under test.
type server = govtest.Backend

var servers []server

const (
	model  = "SmolLM2-135M-Instruct"
	apiKey = "test-api-key"
)

// serveArgs are the flags every server gets.
func serveArgs(engine string) []string {
	return []string{"--engine", engine, "--model", govtest.Model(model), "--python", govtest.VenvPython(),
		"--device", "cpu", "--dtype", "float32", "--max-model-len", "2048", "--api-key", apiKey,
		"--enable-auto-tool-choice", "--tool-call-parser", "hermes",
		"--chat-template", filepath.Join(govtest.RepoRoot(), "templates", "chatml_tools.jinja")}
}

func TestMain(m *testing.M) {
	if _, err := os.Stat(govtest.Model(model)); err != nil {
		fmt.Fprintln(os.Stderr, "test/api: the default model is missing: run scripts/bootstrap (make test does)")
		os.Exit(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "govllm-api-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer os.RemoveAll(dir)
	bin, err := govtest.Build(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "test/api:", err)
		os.Exit(1)
	}
	started, ok := govtest.StartBackends(ctx, "test/api", bin, dir, govtest.Engines("test/api"), serveArgs)
	servers = started
	code := 1
	if ok {
		code = m.Run()
	}
	code = govtest.StopBackends("test/api", servers, code)
	os.Exit(code)
}

// forEach runs f as a subtest per server.
func forEach(t *testing.T, f func(t *testing.T, s server)) {
	for _, s := range servers {
		t.Run(s.Name, func(t *testing.T) { f(t, s) })
	}
}

// runPytest runs one pytest file of this folder against every server, with GOVLLM_URL,
// GOVLLM_MODEL, GOVLLM_BACKEND and GOVLLM_API_KEY in its environment.
func runPytest(t *testing.T, file string) {
	forEach(t, func(t *testing.T, s server) {
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, govtest.VenvPython(), "-m", "pytest", "-q", "-p", "no:cacheprovider", file)
		cmd.Env = append(os.Environ(), "GOVLLM_URL="+s.URL, "GOVLLM_MODEL="+model,
			"GOVLLM_BACKEND="+s.Name, "GOVLLM_API_KEY="+apiKey)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("pytest %s against %s: %v\n%s", file, s.Name, err, out)
		}
		t.Logf("%s", govtest.Tail(string(out), 400))
	})
}
