package registry

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// lockFile takes an exclusive flock on path, creating it, and returns the unlock.
func lockFile(path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("registry: lock: %w", err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("registry: lock %s: %w", path, err)
	}
	return func() {
		_ = unix.Flock(int(f.Fd()), unix.LOCK_UN)
		f.Close()
	}, nil
}

// Instance describes a started server: its process, where it answers, its log and the
// arguments it was started with (argv[1:], which identify the process later).
type Instance struct {
	PID     int       `json:"pid"`
	URL     string    `json:"url"`
	Log     string    `json:"log,omitempty"`
	Started time.Time `json:"started"`
	Args    []string  `json:"args"`
	// Detached is whether it runs in its own session (govllm server start --detach).
	Detached bool `json:"detached"`
}

// State is one server's state directory.
type State struct {
	Dir string
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
		return fmt.Errorf("registry: state: %w", err)
	}
	b, err := json.MarshalIndent(inst, "", "  ")
	if err != nil {
		return fmt.Errorf("registry: state: %w", err)
	}
	if err := writeAtomic(s.InfoFile(), append(b, '\n'), 0o644); err != nil {
		return err
	}
	return writeAtomic(s.PIDFile(), []byte(strconv.Itoa(inst.PID)+"\n"), 0o644)
}

// Clear removes the pid file and the metadata (not the log).
func (s State) Clear() error {
	var errs []error
	for _, p := range []string{s.PIDFile(), s.InfoFile()} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("registry: %w", err))
		}
	}
	return errors.Join(errs...)
}

// Running returns the server's instance when its pid file names a live process that is the
// server (its command line is the recorded one). A pid file whose process is gone, or was
// reused by another program, is stale: Running removes it and reports stale. A missing pid
// file is (Instance{}, false, false, nil).
func (s State) Running() (inst Instance, running, stale bool, err error) {
	b, err := os.ReadFile(s.PIDFile())
	if errors.Is(err, os.ErrNotExist) {
		return Instance{}, false, false, nil
	}
	if err != nil {
		return Instance{}, false, false, fmt.Errorf("registry: %w", err)
	}
	pid, perr := strconv.Atoi(strings.TrimSpace(string(b)))
	if ib, err := os.ReadFile(s.InfoFile()); err == nil {
		_ = json.Unmarshal(ib, &inst)
	}
	if perr == nil && pid > 0 && Alive(pid) && isServer(pid, inst) {
		inst.PID = pid
		return inst, true, false, nil
	}
	if err := s.Clear(); err != nil {
		return inst, false, true, err
	}
	return inst, false, true, nil
}

// isServer reports whether process pid is the recorded server: its arguments after argv[0]
// are the recorded ones (or, without a record, it is a `serve`).
func isServer(pid int, inst Instance) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	argv := strings.Split(strings.TrimSuffix(string(b), "\x00"), "\x00")
	if len(argv) < 2 {
		return false
	}
	if len(inst.Args) > 0 {
		return slices.Equal(argv[1:], inst.Args)
	}
	return argv[1] == "serve"
}

// Alive reports whether process pid exists and has not exited (a zombie counts as exited).
func Alive(pid int) bool {
	if err := syscall.Kill(pid, 0); err != nil && !errors.Is(err, syscall.EPERM) {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return !errors.Is(err, os.ErrNotExist)
	}
	// pid (comm) state …: comm may hold spaces and parentheses; the state follows the last ')'.
	if i := bytes.LastIndexByte(b, ')'); i >= 0 && i+2 < len(b) {
		return b[i+2] != 'Z' && b[i+2] != 'X'
	}
	return true
}

// Stop ends process pid: SIGTERM (govllm serve then drains its requests), up to grace for it
// to exit, then SIGKILL to its process group when it leads one (a detached server and the
// engine processes it started) or to it alone. It reports whether SIGKILL was needed.
func Stop(pid int, grace time.Duration) (killed bool, err error) {
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		if errors.Is(err, syscall.ESRCH) {
			return false, nil
		}
		return false, fmt.Errorf("registry: SIGTERM to %d: %w", pid, err)
	}
	leader := false
	if pgid, err := syscall.Getpgid(pid); err == nil && pgid == pid {
		leader = true
	}
	if waitExit(pid, grace) {
		if leader {
			// Children the server left behind get a moment, then SIGKILL.
			if syscall.Kill(-pid, 0) == nil && !waitGroupExit(pid, 2*time.Second) {
				_ = syscall.Kill(-pid, syscall.SIGKILL)
			}
		}
		return false, nil
	}
	target := pid
	if leader {
		target = -pid
	}
	if err := syscall.Kill(target, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return true, fmt.Errorf("registry: SIGKILL to %d: %w", target, err)
	}
	if !waitExit(pid, 10*time.Second) {
		return true, fmt.Errorf("registry: process %d still runs after SIGKILL", pid)
	}
	return true, nil
}

// waitExit polls until pid has exited or d has passed; it reports whether it exited.
func waitExit(pid int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for Alive(pid) {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
	return true
}

// waitGroupExit polls until process group pgid is empty or d has passed.
func waitGroupExit(pgid int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for syscall.Kill(-pgid, 0) == nil {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
	return true
}
