// Package test holds govllm's end-to-end tests: the real binary over HTTP, and the engine as a
// library, both on the default model with the real transformers backend.
package test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/govllm/govllm/engine"
	"github.com/govllm/govllm/test/internal/govtest"
)

var (
	// binURL is the base URL of the govllm binary started by TestMain.
	binURL string
	// scripted is a govllm binary on the scripted test backend (test/backends/scripted.py),
	// which fails, hangs and streams on cue, behind an API key; bin and tmp start more.
	scripted *govtest.Server
	bin, tmp string
	// lib is an engine opened in this process, as a library user would.
	lib *engine.Engine
)

func defaultModel() string { return govtest.Model("SmolLM2-135M-Instruct") }

func TestMain(m *testing.M) {
	if _, err := os.Stat(defaultModel()); err != nil {
		fmt.Fprintln(os.Stderr, "test: the default model is missing: run scripts/bootstrap (make test does)")
		os.Exit(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var err error
	dir, err := os.MkdirTemp("", "govllm-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin, err = govtest.Build(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "test:", err)
		os.Exit(1)
	}
	tmp = dir
	scripted, err = startScripted(ctx, scriptedArgs...)
	if err != nil {
		fmt.Fprintln(os.Stderr, "test: start govllm on the scripted backend:", err)
		os.Exit(1)
	}
	srv, err := govtest.Start(ctx, bin, dir, "--engine", "transformers", "--model", defaultModel(), "--python", govtest.VenvPython(),
		"--device", device, "--dtype", dtype)
	if err != nil {
		fmt.Fprintln(os.Stderr, "test: start govllm:", err)
		os.Exit(1)
	}
	binURL = srv.URL
	lib, err = engine.Open(ctx, engine.Config{
		Model:  defaultModel(),
		Engine: "transformers",
		Python: govtest.VenvPython(),
		Device: device,
		Dtype:  dtype,
	})
	if err != nil {
		srv.Stop(time.Minute)
		fmt.Fprintln(os.Stderr, "test: open engine:", err)
		os.Exit(1)
	}
	code := m.Run()
	lib.Close()
	if err := scripted.Stop(time.Minute); err != nil && code == 0 {
		fmt.Fprintln(os.Stderr, "test: govllm (scripted) exit:", err)
		code = 1
	}
	if code != 0 {
		fmt.Fprintf(os.Stderr, "--- govllm (scripted) log ---\n%s\n", tail(scripted.Output(), 20000))
	}
	// SIGTERM: the server drains and exits 0.
	if err := srv.Stop(time.Minute); err != nil && code == 0 {
		fmt.Fprintln(os.Stderr, "test: govllm exit:", err)
		code = 1
	}
	if code != 0 {
		fmt.Fprintf(os.Stderr, "--- govllm log ---\n%s\n", srv.Output())
	}
	os.RemoveAll(dir)
	os.Exit(code)
}

// scriptedKey is the API key of the scripted server.
const scriptedKey = "sk-govllm-test"

// scriptedArgs are the limits of the shared scripted server: room for the 1,000-stream test, a
// body limit under the hostile table's 10 MB body.
var scriptedArgs = []string{"--api-key", scriptedKey, "--max-concurrent-requests", "1100",
	"--max-queued-requests", "64", "--max-body-bytes", "4194304"}

// startScripted starts govllm on the scripted backend with extra flags.
func startScripted(ctx context.Context, args ...string) (*govtest.Server, error) {
	root := govtest.RepoRoot()
	return govtest.Start(ctx, bin, tmp, append([]string{"--engine", "scripted:create",
		"--python-path", filepath.Join(root, "test", "backends"), "--model", filepath.Join(root, "test", "testdata", "model"),
		"--python", govtest.VenvPython()}, args...)...)
}

// tail returns the end of s.
func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}
