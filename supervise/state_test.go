package supervise

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// startProc starts a process in its own session, reaped in the background.
func startProc(t *testing.T, name string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	require.NoError(t, cmd.Start())
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
	})
	return cmd
}

func TestStateProbe(t *testing.T) {
	t.Parallel()
	st := State{Dir: filepath.Join(t.TempDir(), "a")}
	got, err := st.Probe()
	require.NoError(t, err)
	require.Equal(t, Status{}, got, "no pid file")

	cmd := startProc(t, "sleep", "60")
	inst := Instance{PID: cmd.Process.Pid, URL: "http://127.0.0.1:1", Args: []string{"60"}, Started: time.Now().UTC()}
	require.NoError(t, st.Write(inst))
	b, err := os.ReadFile(st.PIDFile())
	require.NoError(t, err)
	require.Equal(t, strconv.Itoa(cmd.Process.Pid)+"\n", string(b))
	got, err = st.Probe()
	require.NoError(t, err)
	require.True(t, got.Running)
	require.False(t, got.Stale)
	require.Equal(t, inst.URL, got.URL)
	require.Equal(t, inst.PID, got.PID)

	// Another program under the recorded pid (reuse): stale, and Probe removes the files.
	require.NoError(t, st.Write(Instance{PID: cmd.Process.Pid, Args: []string{"serve", "--port", "1"}}))
	got, err = st.Probe()
	require.NoError(t, err)
	require.False(t, got.Running)
	require.True(t, got.Stale)
	require.NoFileExists(t, st.PIDFile())
	require.NoFileExists(t, st.InfoFile())

	// A process that has exited: stale.
	require.NoError(t, st.Write(inst))
	require.NoError(t, syscall.Kill(cmd.Process.Pid, syscall.SIGKILL))
	require.Eventually(t, func() bool { return !Alive(cmd.Process.Pid) }, 5*time.Second, 10*time.Millisecond)
	got, err = st.Probe()
	require.NoError(t, err)
	require.False(t, got.Running)
	require.True(t, got.Stale)
	require.Equal(t, inst.PID, got.PID, "the recorded pid, for the message")
	require.NoFileExists(t, st.PIDFile())

	// A pid file with garbage: stale.
	require.NoError(t, os.MkdirAll(st.Dir, 0o755))
	require.NoError(t, os.WriteFile(st.PIDFile(), []byte("nope\n"), 0o644))
	got, err = st.Probe()
	require.NoError(t, err)
	require.False(t, got.Running)
	require.True(t, got.Stale)
	require.NoFileExists(t, st.PIDFile())
}

// TestStateInspect: the port check's read of other servers' state leaves their files alone.
func TestStateInspect(t *testing.T) {
	t.Parallel()
	st := State{Dir: t.TempDir()}
	require.NoError(t, st.Write(Instance{PID: 1 << 22, Args: []string{"serve"}})) // no such pid: pids stay below 2^22 (PID_MAX_LIMIT)
	got, err := st.inspect()
	require.NoError(t, err)
	require.True(t, got.Stale)
	require.FileExists(t, st.PIDFile())
	require.FileExists(t, st.InfoFile())
}

func TestStop(t *testing.T) {
	t.Parallel()
	t.Run("SIGTERM is enough", func(t *testing.T) {
		t.Parallel()
		cmd := startProc(t, "sleep", "60")
		killed, err := Stop(cmd.Process.Pid, 10*time.Second)
		require.NoError(t, err)
		require.False(t, killed)
		require.False(t, Alive(cmd.Process.Pid))
	})
	t.Run("SIGKILL after the grace period, to the whole group", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		// The shell and its child ignore SIGTERM; the child writes its pid.
		cmd := startProc(t, "sh", "-c", `trap "" TERM; sleep 60 & echo $! > `+dir+`/child; wait`)
		var child int
		require.Eventually(t, func() bool {
			b, err := os.ReadFile(filepath.Join(dir, "child"))
			if err != nil || len(b) == 0 {
				return false
			}
			child, err = strconv.Atoi(string(b[:len(b)-1]))
			return err == nil
		}, 5*time.Second, 10*time.Millisecond)
		start := time.Now()
		killed, err := Stop(cmd.Process.Pid, 300*time.Millisecond)
		require.NoError(t, err)
		require.True(t, killed)
		require.GreaterOrEqual(t, time.Since(start), 300*time.Millisecond)
		require.False(t, Alive(cmd.Process.Pid))
		require.Eventually(t, func() bool { return !Alive(child) }, 5*time.Second, 10*time.Millisecond, "the group is killed")
	})
	t.Run("already gone", func(t *testing.T) {
		t.Parallel()
		cmd := startProc(t, "true")
		require.Eventually(t, func() bool { return !Alive(cmd.Process.Pid) }, 5*time.Second, 10*time.Millisecond)
		killed, err := Stop(cmd.Process.Pid, time.Second)
		require.NoError(t, err)
		require.False(t, killed)
	})
}

func TestStateDir(t *testing.T) {
	t.Setenv("HOME", "/home/u")
	t.Setenv("XDG_STATE_HOME", "")
	d, err := StateDir("a")
	require.NoError(t, err)
	require.Equal(t, "/home/u/.local/state/govllm/a", d)
	t.Setenv("XDG_STATE_HOME", "/st")
	st, err := StateOf("a")
	require.NoError(t, err)
	require.Equal(t, "/st/govllm/a", st.Dir)
	require.Equal(t, "/st/govllm/a/server.pid", st.PIDFile())
	require.Equal(t, "/st/govllm/a/server.json", st.InfoFile())
	require.Equal(t, "/st/govllm/a/server.log", st.LogFile())
}
