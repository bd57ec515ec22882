package supervise

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/govllm/govllm/registry"
)

// DefaultWait is how long Start waits for a detached server's /health unless told otherwise.
const DefaultWait = 10 * time.Minute

// Sentinel errors. Their text is the phrase the wrapping message reads with ("server s did
// not become healthy: …", "port 8000 on 127.0.0.1 is in use by …").
var (
	// ErrRemote means the entry is a remote endpoint, which govllm does not start.
	ErrRemote = errors.New("is remote")
	// ErrUnhealthy means a detached server exited, or did not answer /health with 200 in
	// time; Start stopped it. The error also wraps the cause (the exit's *exec.ExitError, or
	// context.DeadlineExceeded).
	ErrUnhealthy = errors.New("did not become healthy")
	// ErrPortInUse means a server's port cannot be listened on; the error also wraps the
	// system's error (syscall.EADDRINUSE, or EACCES for a privileged port).
	ErrPortInUse = errors.New("in use")
)

// Supervisor starts govllm servers: `govllm serve` with a registry entry's flags. The zero
// value runs this program's own binary and keeps state in the XDG state directory.
type Supervisor struct {
	// Executable returns the govllm binary to run as `govllm serve`; nil means
	// os.Executable, this program. Tests point it at a fake server.
	Executable func() (string, error)
	// StateRoot holds the servers' state directories, StateRoot/<name>; "" means
	// $XDG_STATE_HOME/govllm (see StateDir).
	StateRoot string
	// Logger receives the warnings that do not fail a start (a pid file that could not be
	// written or removed); nil means slog.Default().
	Logger *slog.Logger
}

// StartOptions are the settings of one start beyond the entry's.
type StartOptions struct {
	// Args are more `govllm serve` flags, passed after the entry's own (Entry.ServeArgs).
	Args []string
	// Wait bounds how long Start waits for /health to answer 200; 0 means DefaultWait. Run
	// does not wait for /health.
	Wait time.Duration
	// Stdout and Stderr receive a foreground server's output (nil discards it, as in
	// exec.Cmd). A detached server writes both to its log file instead.
	Stdout, Stderr io.Writer
	// Started, when not nil, is called once the server's process runs and its pid file is
	// written, before it is healthy.
	Started func(Instance)
}

// State returns the state directory of the server called name.
func (s *Supervisor) State(name string) (State, error) {
	if s.StateRoot != "" {
		return State{Dir: filepath.Join(s.StateRoot, name)}, nil
	}
	return StateOf(name)
}

func (s *Supervisor) logger() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.Default()
}

// prepare finds what a start of e needs: its state directory, the binary and the instance
// to record (without its pid).
func (s *Supervisor) prepare(e registry.Entry, opts StartOptions, detached bool) (State, string, Instance, error) {
	if e.Remote() {
		return State{}, "", Instance{}, fmt.Errorf("supervise: server %s %w (%s): govllm cannot start it", e.Name, ErrRemote, e.EndpointURL)
	}
	st, err := s.State(e.Name)
	if err != nil {
		return State{}, "", Instance{}, err
	}
	executable := s.Executable
	if executable == nil {
		executable = os.Executable
	}
	exe, err := executable()
	if err != nil {
		return State{}, "", Instance{}, fmt.Errorf("supervise: cannot find the govllm binary: %w", err)
	}
	inst := Instance{URL: e.URL(), Args: append(e.ServeArgs(), opts.Args...),
		Started: time.Now().UTC().Truncate(time.Second), Detached: detached}
	return st, exe, inst, nil
}

// Run runs the server of entry e (a local entry, normalized) in the foreground and waits for
// it to exit, with a pid file while it runs. The caller checks first that it does not run
// already (State.Probe) and that its port is free (CheckPort).
//
// The server runs in its own process group, so that a terminal's Ctrl-C reaches it once:
// while Run waits, it catches SIGINT, SIGTERM, SIGHUP and SIGQUIT in this process and
// forwards them to the server, which then drains and exits. When ctx ends, Run sends it
// SIGTERM and goes on waiting. The server also gets SIGTERM should this process die.
//
// Run returns the server's exit code: its exit status, or 128+N when signal N ended it (as a
// shell reports it). An error means it could not be started or waited for.
func (s *Supervisor) Run(ctx context.Context, e registry.Entry, opts StartOptions) (int, error) {
	st, exe, inst, err := s.prepare(e, opts, false)
	if err != nil {
		return -1, err
	}
	cmd := exec.Command(exe, inst.Args...)
	cmd.Stdout, cmd.Stderr = opts.Stdout, opts.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT)
	defer signal.Stop(sigs)
	if err := cmd.Start(); err != nil {
		return -1, fmt.Errorf("supervise: start server %s: %w", e.Name, err)
	}
	inst.PID = cmd.Process.Pid
	if err := st.Write(inst); err != nil {
		s.logger().Warn("the server runs without a pid file", "server", e.Name, "pid", inst.PID, "err", err)
	}
	defer func() {
		if err := st.Clear(); err != nil {
			s.logger().Warn("cannot remove the pid file", "server", e.Name, "err", err)
		}
	}()
	if opts.Started != nil {
		opts.Started(inst)
	}
	done := make(chan struct{})
	forwarded := make(chan struct{})
	go func() {
		defer close(forwarded)
		ctxDone := ctx.Done()
		for {
			select {
			case sig := <-sigs:
				_ = cmd.Process.Signal(sig)
			case <-ctxDone:
				_ = cmd.Process.Signal(syscall.SIGTERM)
				ctxDone = nil // once
			case <-done:
				return
			}
		}
	}()
	err = cmd.Wait()
	close(done)
	<-forwarded
	var exit *exec.ExitError
	switch {
	case err == nil:
		return 0, nil
	case errors.As(err, &exit):
		if ws, ok := exit.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal()), nil
		}
		return exit.ExitCode(), nil
	default:
		return -1, fmt.Errorf("supervise: server %s: %w", e.Name, err)
	}
}

// Start starts the server of entry e (a local entry, normalized) detached: in its own
// session, with its output in the state directory's log (the previous one kept as
// LogFile()+".1") and its pid file written, then waits until its /health answers 200, for
// up to opts.Wait or until ctx ends. The caller checks first that it does not run already
// (State.Probe) and that its port is free (CheckPort).
//
// Start returns the instance of the healthy server, which runs on after this process exits
// (Stop ends it). When the server exits first or the wait ends, Start kills its process
// group, removes its pid file and returns an error that wraps ErrUnhealthy and shows the
// log's last lines, with the instance (its Log still names the log).
func (s *Supervisor) Start(ctx context.Context, e registry.Entry, opts StartOptions) (Instance, error) {
	st, exe, inst, err := s.prepare(e, opts, true)
	if err != nil {
		return Instance{}, err
	}
	if err := os.MkdirAll(st.Dir, 0o755); err != nil {
		return Instance{}, fmt.Errorf("supervise: %w", err)
	}
	inst.Log = st.LogFile()
	if _, err := os.Stat(inst.Log); err == nil {
		_ = os.Rename(inst.Log, inst.Log+".1")
	}
	logf, err := os.OpenFile(inst.Log, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return Instance{}, fmt.Errorf("supervise: %w", err)
	}
	defer logf.Close()
	fmt.Fprintf(logf, "# govllm server start %s, %s: %s %s\n", e.Name, inst.Started.Format(time.RFC3339), exe, ShellJoin(inst.Args))
	cmd := exec.Command(exe, inst.Args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return Instance{}, fmt.Errorf("supervise: start server %s: %w", e.Name, err)
	}
	inst.PID = cmd.Process.Pid
	c := reap(cmd)
	if err := st.Write(inst); err != nil {
		_ = syscall.Kill(-inst.PID, syscall.SIGKILL)
		<-c.done
		return Instance{}, err
	}
	if opts.Started != nil {
		opts.Started(inst)
	}
	wait := opts.Wait
	if wait <= 0 {
		wait = DefaultWait
	}
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	err = waitHealthy(wctx, inst.URL, c)
	if err == nil {
		return inst, nil
	}
	if Alive(inst.PID) {
		_ = syscall.Kill(-inst.PID, syscall.SIGKILL)
	}
	select {
	case <-c.done:
	case <-time.After(10 * time.Second):
	}
	if cerr := st.Clear(); cerr != nil {
		s.logger().Warn("cannot remove the pid file", "server", e.Name, "err", cerr)
	}
	return inst, fmt.Errorf("supervise: server %s %w: %w\n--- last lines of %s ---\n%s", e.Name, ErrUnhealthy, err, inst.Log, logTail(inst.Log, 40))
}

// child is a started process that a goroutine waits for.
type child struct {
	done chan struct{} // closed once it has exited and been reaped
	err  error         // cmd.Wait's; set before done is closed
}

// reap waits for cmd in the background.
func reap(cmd *exec.Cmd) *child {
	c := &child{done: make(chan struct{})}
	go func() {
		c.err = cmd.Wait()
		close(c.done)
	}()
	return c
}

// waitHealthy polls url/health until it answers 200, the process exits or ctx ends.
func waitHealthy(ctx context.Context, url string, c *child) error {
	client := &http.Client{Timeout: 2 * time.Second}
	defer client.CloseIdleConnections()
	last := "no answer yet"
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url+"/health", nil)
		if err != nil {
			return fmt.Errorf("health check: %w", err)
		}
		resp, err := client.Do(req)
		if err == nil {
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("/health answered %d %s", resp.StatusCode, bytes.TrimSpace(b))
		}
		select {
		case <-c.done:
			if c.err == nil {
				return errors.New("it exited (exit status 0)")
			}
			return fmt.Errorf("it exited (%w)", c.err)
		case <-ctx.Done():
			return fmt.Errorf("%w (%s)", ctx.Err(), last)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// logTail returns the last n lines of the file at path.
func logTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// ShellJoin quotes args for a POSIX shell where needed, as the log's first line and
// `govllm server show` print a command.
func ShellJoin(args []string) string {
	out := make([]string, len(args))
	for i, a := range args {
		if a == "" || strings.ContainsAny(a, " \t\n'\"\\$`*?[]{}()<>|&;#~!") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		out[i] = a
	}
	return strings.Join(out, " ")
}
