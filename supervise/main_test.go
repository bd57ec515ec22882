package supervise

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/govllm/govllm/registry"
)

// TestMain makes the test binary a fake `govllm serve` when run as `<binary> serve … --fake
// MODE` (which a real test run never is): the tests' Supervisor runs this binary, and the
// mode travels in the entry's serve flags, so tests that start servers can run in parallel.
func TestMain(m *testing.M) {
	if len(os.Args) > 2 && os.Args[1] == "serve" {
		if i := slices.Index(os.Args, "--fake"); i > 0 && i+1 < len(os.Args) {
			os.Exit(fakeServe(os.Args[i+1], os.Args[2:]))
		}
	}
	goleak.VerifyTestMain(m)
}

// fakeServe serves /health on --host/--port. Modes: "ok" (200, drains on SIGTERM), "ignore-term"
// (also ignores SIGTERM), "unhealthy" (/health answers 503), "fail" (exits 1 at once).
func fakeServe(mode string, args []string) int {
	host, port := "127.0.0.1", "8000"
	for i := 0; i+1 < len(args); i++ {
		switch args[i] {
		case "--host":
			host = args[i+1]
		case "--port":
			port = args[i+1]
		}
	}
	fmt.Fprintf(os.Stderr, "fake serve: %v\n", args)
	switch mode {
	case "fail":
		fmt.Fprintln(os.Stderr, "govllm serve: boom: cannot import vllm")
		return 1
	case "ignore-term":
		signal.Ignore(syscall.SIGTERM)
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(host, port))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		if mode == "unhealthy" {
			http.Error(w, "engine loading", http.StatusServiceUnavailable)
		}
	})}
	go func() { _ = srv.Serve(ln) }()
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = srv.Shutdown(sctx)
	fmt.Fprintln(os.Stderr, "fake serve: stopped")
	return 0
}

// testSupervisor runs this test binary as the server, with state in a temporary directory.
func testSupervisor(t *testing.T) *Supervisor {
	t.Helper()
	return &Supervisor{
		Executable: os.Executable,
		StateRoot:  t.TempDir(),
		Logger:     slog.New(slog.NewTextHandler(t.Output(), nil)),
	}
}

// fakeEntry is a local entry on a free port whose server is the fake in mode.
func fakeEntry(t *testing.T, name, mode string) registry.Entry {
	t.Helper()
	model := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(model, "config.json"), []byte(`{}`), 0o644))
	e := registry.Entry{Name: name, Model: model, Port: freePort(t), Args: []string{"--fake", mode}}
	require.NoError(t, e.Normalize())
	return e
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// stopAtEnd stops the server of pid when the test ends, whatever happened.
func stopAtEnd(t *testing.T, pid int) {
	t.Cleanup(func() {
		if Alive(pid) {
			_, _ = Stop(pid, time.Second)
		}
	})
}
