// Package test holds govllm's end-to-end tests: the real binary over HTTP, and the engine as a
// library, both on the default model with the real transformers backend.
package test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"testing"
	"time"

	"github.com/govllm/govllm/engine"
)

var (
	// binURL is the base URL of the govllm binary started by TestMain.
	binURL string
	// lib is an engine opened in this process, as a library user would.
	lib *engine.Engine
)

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(filepath.Dir(file))
}

func defaultModel() string {
	return filepath.Join(repoRoot(), "models", "SmolLM2-135M-Instruct")
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// startBinary builds bin/govllm into dir and serves the default model on a free port from a
// working directory outside the repo, as a user would run the installed binary.
func startBinary(ctx context.Context, dir string) (*exec.Cmd, string, error) {
	bin := filepath.Join(dir, "govllm")
	build := exec.Command("go", "build", "-o", bin, "./cmd/govllm")
	build.Dir = repoRoot()
	if out, err := build.CombinedOutput(); err != nil {
		return nil, "", fmt.Errorf("go build (run `make build` first for the shim): %v\n%s", err, out)
	}
	port, err := freePort()
	if err != nil {
		return nil, "", err
	}
	cmd := exec.Command(bin, "serve", "--engine", "transformers", "--model", defaultModel(),
		"--python", filepath.Join(repoRoot(), ".venv", "bin", "python"), "--port", strconv.Itoa(port))
	cmd.Dir = dir
	logf, err := os.Create(filepath.Join(dir, "govllm.log"))
	if err != nil {
		return nil, "", err
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return nil, "", err
	}
	url := fmt.Sprintf("http://127.0.0.1:%d", port)
	for {
		resp, err := http.Get(url + "/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return cmd, url, nil
			}
		}
		select {
		case <-ctx.Done():
			cmd.Process.Kill()
			log, _ := os.ReadFile(logf.Name())
			return nil, "", fmt.Errorf("govllm did not become healthy: %v\n%s", ctx.Err(), log)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func TestMain(m *testing.M) {
	if _, err := os.Stat(defaultModel()); err != nil {
		fmt.Fprintln(os.Stderr, "test: the default model is missing: run scripts/bootstrap (make test does)")
		os.Exit(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "govllm-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	cmd, url, err := startBinary(ctx, dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "test: start govllm:", err)
		os.Exit(1)
	}
	binURL = url
	lib, err = engine.Open(ctx, engine.Config{
		Model:  defaultModel(),
		Engine: "transformers",
		Python: filepath.Join(repoRoot(), ".venv", "bin", "python"),
	})
	if err != nil {
		cmd.Process.Kill()
		fmt.Fprintln(os.Stderr, "test: open engine:", err)
		os.Exit(1)
	}
	code := m.Run()
	lib.Close()
	// SIGTERM: the server drains and exits 0.
	cmd.Process.Signal(os.Interrupt)
	waitErr := make(chan error, 1)
	go func() { waitErr <- cmd.Wait() }()
	select {
	case err := <-waitErr:
		if err != nil && code == 0 {
			fmt.Fprintln(os.Stderr, "test: govllm exited with", err)
			code = 1
		}
	case <-time.After(time.Minute):
		cmd.Process.Kill()
		fmt.Fprintln(os.Stderr, "test: govllm did not exit within a minute of SIGINT")
		code = 1
	}
	if code != 0 {
		if log, err := os.ReadFile(filepath.Join(dir, "govllm.log")); err == nil {
			fmt.Fprintf(os.Stderr, "--- govllm log ---\n%s\n", log)
		}
	}
	os.RemoveAll(dir)
	os.Exit(code)
}
