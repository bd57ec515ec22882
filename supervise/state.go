// Package supervise runs govllm's local servers as processes: it checks that a registry
// entry's port is free, starts `govllm serve` for the entry in the foreground (signals
// forwarded) or detached (its own session, a log file, a pid file), waits until /health
// answers, tells whether a recorded server still runs, and stops it (SIGTERM, then SIGKILL to
// its process group).
//
// It is apart from package registry because the two keep different things: registry is the
// store of what servers there are (one JSON file under a lock, edited by `govllm server add`
// and rm), while supervise deals with processes that come and go: pid files that go stale,
// /proc, signals, ports. A server's state lives in $XDG_STATE_HOME/govllm/<name>/ (default
// ~/.local/state): server.pid, server.json (its Instance) and server.log.
package supervise

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/govllm/govllm/internal/atomicfile"
	"github.com/govllm/govllm/internal/xdg"
)

// Instance describes a started server: its process, where it answers, its log and the
// arguments it was started with (argv[1:], which identify the process later).
type Instance struct {
	// PID is the server's process id (for a detached server, also its session and process
	// group id).
	PID int `json:"pid"`
	// URL is the base URL it answers on (http://host:port).
	URL string `json:"url"`
	// Log is the file its output goes to; empty for a foreground server.
	Log string `json:"log,omitempty"`
	// Started is when it was started (UTC, to the second).
	Started time.Time `json:"started"`
	// Args are its arguments after argv[0] (`serve …`); Probe compares them with the
	// process's command line to tell the server from a program that reuses its pid.
	Args []string `json:"args"`
	// Detached is whether it runs in its own session (govllm server start --detach).
	Detached bool `json:"detached"`
}

// State is one server's state directory.
type State struct {
	// Dir is the directory; it is created when the server starts.
	Dir string
}

// StateDir is where a server's pid file, metadata and log live:
// $XDG_STATE_HOME/govllm/<name>, with XDG_STATE_HOME defaulting to ~/.local/state.
func StateDir(name string) (string, error) {
	dir, err := xdg.StateHome()
	if err != nil {
		return "", fmt.Errorf("supervise: %w", err)
	}
	return filepath.Join(dir, "govllm", name), nil
}

// StateOf returns the state directory of the server called name (see StateDir).
func StateOf(name string) (State, error) {
	d, err := StateDir(name)
	if err != nil {
		return State{}, err
	}
	return State{Dir: d}, nil
}

// PIDFile is the file holding the server's pid (one decimal line).
func (s State) PIDFile() string { return filepath.Join(s.Dir, "server.pid") }

// InfoFile is the JSON Instance of the running server.
func (s State) InfoFile() string { return filepath.Join(s.Dir, "server.json") }

// LogFile is the detached server's combined output (the previous start's is LogFile()+".1").
func (s State) LogFile() string { return filepath.Join(s.Dir, "server.log") }

// Write records a started server: its metadata, then its pid file.
func (s State) Write(inst Instance) error {
	if err := os.MkdirAll(s.Dir, 0o755); err != nil {
		return fmt.Errorf("supervise: state: %w", err)
	}
	b, err := json.MarshalIndent(inst, "", "  ")
	if err != nil {
		return fmt.Errorf("supervise: state: %w", err)
	}
	if err := atomicfile.WriteFile(s.InfoFile(), append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("supervise: %w", err)
	}
	if err := atomicfile.WriteFile(s.PIDFile(), []byte(strconv.Itoa(inst.PID)+"\n"), 0o644); err != nil {
		return fmt.Errorf("supervise: %w", err)
	}
	return nil
}

// Clear removes the pid file and the metadata (not the log).
func (s State) Clear() error {
	var errs []error
	for _, p := range []string{s.PIDFile(), s.InfoFile()} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("supervise: %w", err))
		}
	}
	return errors.Join(errs...)
}

// Status is what Probe found in a server's state directory.
type Status struct {
	// Instance is the recorded server (zero without a record); when Running, its PID is the
	// pid file's.
	Instance
	// Running is whether the pid file names a live process that is the recorded server.
	Running bool
	// Stale is whether the pid file named no such process: its process is gone, or the pid
	// was reused by another program, or the file is garbage.
	Stale bool
}

// Probe tells whether the server runs: whether its pid file names a live process that is the
// server (its command line is the recorded one). Probe is not a pure query: a stale pid file
// is removed, with the info file, and reported as Stale, so that the next start finds a
// clean directory. A missing pid file is Status{}.
func (s State) Probe() (Status, error) {
	st, err := s.inspect()
	if err != nil || !st.Stale {
		return st, err
	}
	return st, s.Clear()
}

// inspect is Probe without the removal of a stale pid file.
func (s State) inspect() (Status, error) {
	b, err := os.ReadFile(s.PIDFile())
	if errors.Is(err, os.ErrNotExist) {
		return Status{}, nil
	}
	if err != nil {
		return Status{}, fmt.Errorf("supervise: %w", err)
	}
	var st Status
	if ib, err := os.ReadFile(s.InfoFile()); err == nil {
		_ = json.Unmarshal(ib, &st.Instance)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err == nil && pid > 0 && Alive(pid) && isServer(pid, st.Instance) {
		st.PID, st.Running = pid, true
		return st, nil
	}
	st.Stale = true
	return st, nil
}
