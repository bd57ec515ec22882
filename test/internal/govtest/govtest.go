// Package govtest starts the real govllm binary for end-to-end tests.
package govtest

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
	"syscall"
	"time"
)

// RepoRoot is the repository's root directory: $GOVLLM_REPO when set (test binaries built on
// one machine and run on another, as scripts/gpu-check does), else where this source file is.
func RepoRoot() string {
	if r := os.Getenv("GOVLLM_REPO"); r != "" {
		return r
	}
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "..")
}

// VenvPython is the interpreter the tests embed: $GOVLLM_PYTHON (a CUDA host's venv with
// vllm, say), else the project venv's.
func VenvPython() string {
	if p := os.Getenv("GOVLLM_PYTHON"); p != "" {
		return p
	}
	return filepath.Join(RepoRoot(), ".venv", "bin", "python")
}

// Model returns the path of a model directory under models/.
func Model(name string) string { return filepath.Join(RepoRoot(), "models", name) }

// Build compiles cmd/govllm into dir (the shim must have been built: `make build`), or returns
// $GOVLLM_BIN, a prebuilt binary, on hosts without Go.
func Build(dir string) (string, error) {
	if b := os.Getenv("GOVLLM_BIN"); b != "" {
		return b, nil
	}
	bin := filepath.Join(dir, "govllm")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/govllm")
	cmd.Dir = RepoRoot()
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build (run `make build` first for the shim): %v\n%s", err, out)
	}
	return bin, nil
}

// Server is a running `govllm serve`.
type Server struct {
	URL string
	Cmd *exec.Cmd
	Log string // path of its combined output

	waited chan struct{}
	err    error
}

// Start runs `bin serve args...` on a free port from dir (outside the repo, as a user would run
// an installed binary) and waits until /health answers 200 or ctx ends.
func Start(ctx context.Context, bin, dir string, args ...string) (*Server, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	logPath := filepath.Join(dir, fmt.Sprintf("govllm-%d.log", port))
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(bin, append([]string{"serve", "--port", strconv.Itoa(port)}, args...)...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	s := &Server{URL: fmt.Sprintf("http://127.0.0.1:%d", port), Cmd: cmd, Log: logPath, waited: make(chan struct{})}
	go func() {
		s.err = cmd.Wait()
		close(s.waited)
	}()
	for {
		resp, err := http.Get(s.URL + "/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return s, nil
			}
		}
		select {
		case <-s.waited:
			return nil, fmt.Errorf("govllm exited before it was healthy (%v):\n%s", s.err, s.Output())
		case <-ctx.Done():
			cmd.Process.Kill()
			<-s.waited
			return nil, fmt.Errorf("govllm did not become healthy: %v\n%s", ctx.Err(), s.Output())
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// Output returns what the server printed so far.
func (s *Server) Output() string {
	b, _ := os.ReadFile(s.Log)
	return string(b)
}

// Exited is closed when the process has exited; Err then holds its exit error.
func (s *Server) Exited() <-chan struct{} { return s.waited }

// Err is the process's exit error, valid once Exited is closed.
func (s *Server) Err() error { return s.err }

// Stop sends SIGTERM and waits up to timeout for the exit, killing the process after it.
// It returns the exit error.
func (s *Server) Stop(timeout time.Duration) error {
	s.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.waited:
		return s.err
	case <-time.After(timeout):
		s.Cmd.Process.Kill()
		<-s.waited
		return fmt.Errorf("govllm did not exit within %v of SIGTERM", timeout)
	}
}

// Children returns the pids of the process's direct children.
func Children(pid int) []int {
	var out []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		child, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces, so parse after the last ')'.
		i := len(b) - 1
		for i > 0 && b[i] != ')' {
			i--
		}
		var state string
		var ppid int
		if _, err := fmt.Sscanf(string(b[i+1:]), " %s %d", &state, &ppid); err == nil && ppid == pid {
			out = append(out, child)
		}
	}
	return out
}
