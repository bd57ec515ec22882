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
	"sync"
	"testing"
	"time"

	"github.com/govllm/govllm/test/internal/govtest"
)

// server is one govllm binary under test.
type server struct {
	name string // the backend: "vllm" or "transformers"
	url  string
	srv  *govtest.Server
}

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
	engines := []string{"transformers"}
	if exec.Command(govtest.VenvPython(), "-c", "import vllm").Run() == nil {
		engines = append([]string{"vllm"}, engines...)
	} else {
		fmt.Println("test/api: the venv cannot import vllm: the vllm backend is not tested")
	}
	// The servers start side by side (the model loads take most of the time).
	var wg sync.WaitGroup
	started := make([]server, len(engines))
	errs := make([]error, len(engines))
	for i, engine := range engines {
		wg.Go(func() {
			srv, err := govtest.Start(ctx, bin, dir, serveArgs(engine)...)
			started[i], errs[i] = server{name: engine, srv: srv}, err
			if srv != nil {
				started[i].url = srv.URL
			}
		})
	}
	wg.Wait()
	failed := false
	for i, err := range errs {
		if err != nil {
			fmt.Fprintf(os.Stderr, "test/api: start govllm --engine %s: %v\n", engines[i], err)
			failed = true
		} else {
			servers = append(servers, started[i])
		}
	}
	code := 1
	if !failed {
		code = m.Run()
	}
	for _, s := range servers {
		if err := s.srv.Stop(time.Minute); err != nil && code == 0 {
			fmt.Fprintf(os.Stderr, "test/api: govllm (%s) exit: %v\n", s.name, err)
			code = 1
		}
		if code != 0 {
			fmt.Fprintf(os.Stderr, "--- govllm (%s) log ---\n%s\n", s.name, tail(s.srv.Output(), 20000))
		}
	}
	os.Exit(code)
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// forEach runs f as a subtest per server.
func forEach(t *testing.T, f func(t *testing.T, s server)) {
	for _, s := range servers {
		t.Run(s.name, func(t *testing.T) { f(t, s) })
	}
}

// runPytest runs one pytest file of this folder against every server, with GOVLLM_URL,
// GOVLLM_MODEL, GOVLLM_BACKEND and GOVLLM_API_KEY in its environment.
func runPytest(t *testing.T, file string) {
	forEach(t, func(t *testing.T, s server) {
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, govtest.VenvPython(), "-m", "pytest", "-q", "-p", "no:cacheprovider", file)
		cmd.Env = append(os.Environ(), "GOVLLM_URL="+s.url, "GOVLLM_MODEL="+model,
			"GOVLLM_BACKEND="+s.name, "GOVLLM_API_KEY="+apiKey)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("pytest %s against %s: %v\n%s", file, s.name, err, out)
		}
		t.Logf("%s", tail(string(out), 400))
	})
}
