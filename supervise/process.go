package supervise

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"syscall"
	"time"
)

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
		return false, fmt.Errorf("supervise: SIGTERM to %d: %w", pid, err)
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
		return true, fmt.Errorf("supervise: SIGKILL to %d: %w", target, err)
	}
	if !waitExit(pid, 10*time.Second) {
		return true, fmt.Errorf("supervise: process %d still runs after SIGKILL", pid)
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
