// Package agent holds the end-to-end tests of the agent-era API — structured outputs, tool
// calls (forced and parsed), tool-result round trips, logit_bias — through real clients (the
// openai Python SDK, openai-go) against the govllm binary on the default model, on both
// backends: vLLM (when the venv has it) and transformers. Each backend's server starts once per
// test binary, with auto tool choice (hermes) and the shipped tool template.
package agent

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

// reasoning is a transformers server on the random-weights tiny model with --reasoning-parser
// qwen3: a regex makes it write "<think>…</think>…", which the parser splits.
var reasoning server

const model = "SmolLM2-135M-Instruct"

// serveArgs are the flags every server gets: the default model, hermes auto tool choice and
// the tool-capable ChatML template the repository ships.
func serveArgs(engine string) []string {
	return []string{"--engine", engine, "--model", govtest.Model(model), "--python", govtest.VenvPython(),
		"--device", "cpu", "--dtype", "float32", "--max-model-len", "2048",
		"--enable-auto-tool-choice", "--tool-call-parser", "hermes",
		"--chat-template", filepath.Join(govtest.RepoRoot(), "templates", "chatml_tools.jinja")}
}

func TestMain(m *testing.M) {
	if _, err := os.Stat(govtest.Model(model)); err != nil {
		fmt.Fprintln(os.Stderr, "test/agent: the default model is missing: run scripts/bootstrap (make test does)")
		os.Exit(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "govllm-agent-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer os.RemoveAll(dir)
	bin, err := govtest.Build(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "test/agent:", err)
		os.Exit(1)
	}
	// The servers start side by side (the model loads take most of the time).
	names := append(govtest.Engines("test/agent"), "reasoning")
	started, ok := govtest.StartBackends(ctx, "test/agent", bin, dir, names, func(name string) []string {
		if name == "reasoning" {
			return []string{"--engine", "transformers", "--model", govtest.Model("tiny-llama-dummy"),
				"--load-format", "dummy", "--python", govtest.VenvPython(), "--device", "cpu", "--reasoning-parser", "qwen3"}
		}
		return serveArgs(name)
	})
	for _, b := range started {
		if b.Name == "reasoning" {
			reasoning = b
		} else {
			servers = append(servers, b)
		}
	}
	code := 1
	if ok {
		code = m.Run()
	}
	code = govtest.StopBackends("test/agent", started, code)
	os.Exit(code)
}

// forEach runs f as a subtest per server.
func forEach(t *testing.T, f func(t *testing.T, s server)) {
	for _, s := range servers {
		t.Run(s.Name, func(t *testing.T) { f(t, s) })
	}
}

// TestPythonSDK runs sdk_test.py (pytest, the openai Python SDK from the venv) against every
// server.
func TestPythonSDK(t *testing.T) {
	forEach(t, func(t *testing.T, s server) {
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, govtest.VenvPython(), "-m", "pytest", "-q", "-p", "no:cacheprovider", "sdk_test.py")
		cmd.Env = append(os.Environ(), "GOVLLM_URL="+s.URL, "GOVLLM_MODEL="+model, "GOVLLM_BACKEND="+s.Name)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("pytest sdk_test.py against %s: %v\n%s", s.Name, err, out)
		}
		t.Logf("%s", govtest.Tail(string(out), 400))
	})
}
