package test

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/test/internal/govtest"
)

// TestInterruptDuringStartup sends Ctrl-C (SIGINT) to govllm serve while its backend is still
// loading (a scripted start that takes ten minutes): the start is cancelled and the process
// exits at once with the reason, instead of waiting for the load.
func TestInterruptDuringStartup(t *testing.T) {
	root := govtest.RepoRoot()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	logPath := filepath.Join(t.TempDir(), "serve.log")
	logf, err := os.Create(logPath)
	require.NoError(t, err)
	defer logf.Close()
	cmd := exec.Command(bin, "serve", "--port", strconv.Itoa(port), "--engine", "scripted:create",
		"--python-path", filepath.Join(root, "test", "backends"), "--model", filepath.Join(root, "test", "testdata", "model"),
		"--python", govtest.VenvPython(), "--engine-arg", "start_delay=600")
	cmd.Dir = tmp
	cmd.Stdout, cmd.Stderr = logf, logf
	require.NoError(t, cmd.Start())
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	output := func() string { b, _ := os.ReadFile(logPath); return string(b) }

	// Wait until the bridge runs (the interpreter is up and start() is sleeping).
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for !strings.Contains(output(), "engine: starting") {
		select {
		case err := <-exited:
			t.Fatalf("govllm exited before starting the engine (%v):\n%s", err, output())
		case <-ctx.Done():
			t.Fatalf("the engine did not start:\n%s", output())
		case <-time.After(100 * time.Millisecond):
		}
	}
	time.Sleep(2 * time.Second) // well inside the 600 s start
	sent := time.Now()
	require.NoError(t, cmd.Process.Signal(syscall.SIGINT))
	select {
	case err := <-exited:
		var ee *exec.ExitError
		require.True(t, errors.As(err, &ee), "exit status, not %v", err)
		require.Equal(t, 1, ee.ExitCode(), output())
		require.Contains(t, output(), "start cancelled")
		t.Logf("exited %v after SIGINT", time.Since(sent).Round(time.Millisecond))
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatalf("govllm still running 30 s after SIGINT during startup:\n%s", output())
	}
}
