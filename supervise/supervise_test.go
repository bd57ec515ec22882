package supervise

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/govllm/govllm/registry"
)

func TestStartDetached(t *testing.T) {
	t.Parallel()
	sup := testSupervisor(t)
	e := fakeEntry(t, "s", "ok")
	var started Instance
	inst, err := sup.Start(context.Background(), e, StartOptions{Args: []string{"--max-model-len", "64"}, Wait: 30 * time.Second,
		Started: func(i Instance) { started = i }})
	require.NoError(t, err)
	stopAtEnd(t, inst.PID)
	require.Equal(t, inst, started, "Started saw the instance before it was healthy")
	require.True(t, inst.Detached)
	require.Equal(t, e.URL(), inst.URL)
	require.Equal(t, append(e.ServeArgs(), "--max-model-len", "64"), inst.Args)
	sid, err := unix.Getsid(inst.PID)
	require.NoError(t, err)
	require.Equal(t, inst.PID, sid, "detached: its own session")

	st, err := sup.State("s")
	require.NoError(t, err)
	require.Equal(t, st.LogFile(), inst.Log)
	ps, err := st.Probe()
	require.NoError(t, err)
	require.True(t, ps.Running)
	require.Equal(t, inst.PID, ps.PID)
	log, err := os.ReadFile(st.LogFile())
	require.NoError(t, err)
	require.Contains(t, string(log), "# govllm server start s, ")
	require.Contains(t, string(log), "fake serve: [--host 127.0.0.1 --port "+strconv.Itoa(e.Port))

	killed, err := Stop(inst.PID, 10*time.Second)
	require.NoError(t, err)
	require.False(t, killed)
	log, err = os.ReadFile(st.LogFile())
	require.NoError(t, err)
	require.Contains(t, string(log), "fake serve: stopped", "SIGTERM: a clean exit")

	// The next start keeps the previous log.
	require.NoError(t, st.Clear())
	inst2, err := sup.Start(context.Background(), e, StartOptions{Wait: 30 * time.Second})
	require.NoError(t, err)
	stopAtEnd(t, inst2.PID)
	prev, err := os.ReadFile(st.LogFile() + ".1")
	require.NoError(t, err)
	require.Equal(t, string(log), string(prev))
	_, err = Stop(inst2.PID, 10*time.Second)
	require.NoError(t, err)
}

func TestStartFails(t *testing.T) {
	t.Parallel()
	sup := testSupervisor(t)
	begin := time.Now()
	_, err := sup.Start(context.Background(), fakeEntry(t, "s", "fail"), StartOptions{Wait: 30 * time.Second})
	require.ErrorIs(t, err, ErrUnhealthy)
	var exit *exec.ExitError
	require.ErrorAs(t, err, &exit)
	require.Equal(t, 1, exit.ExitCode())
	require.ErrorContains(t, err, "server s did not become healthy: it exited (exit status 1)")
	require.ErrorContains(t, err, "govllm serve: boom: cannot import vllm", "the log's tail")
	// An exit is seen at once; the clean-up's 10 s wait for it is not spent.
	require.Less(t, time.Since(begin), 9*time.Second)
	st, err := sup.State("s")
	require.NoError(t, err)
	require.NoFileExists(t, st.PIDFile())
	require.FileExists(t, st.LogFile())
}

func TestStartTimesOut(t *testing.T) {
	t.Parallel()
	sup := testSupervisor(t)
	var pid int
	_, err := sup.Start(context.Background(), fakeEntry(t, "s", "unhealthy"), StartOptions{Wait: 700 * time.Millisecond,
		Started: func(i Instance) { pid = i.PID }})
	require.ErrorIs(t, err, ErrUnhealthy)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.ErrorContains(t, err, "/health answered 503 engine loading")
	require.NotZero(t, pid)
	require.Eventually(t, func() bool { return !Alive(pid) }, 10*time.Second, 10*time.Millisecond, "killed")
	st, err := sup.State("s")
	require.NoError(t, err)
	require.NoFileExists(t, st.PIDFile())
}

func TestStartRefuses(t *testing.T) {
	t.Parallel()
	sup := testSupervisor(t)
	remote := registry.Entry{Name: "r", EndpointURL: "http://h:1"}
	_, err := sup.Start(context.Background(), remote, StartOptions{})
	require.ErrorIs(t, err, ErrRemote)
	require.ErrorContains(t, err, "server r is remote (http://h:1): govllm cannot start it")
	_, err = sup.Run(context.Background(), remote, StartOptions{})
	require.ErrorIs(t, err, ErrRemote)

	missing := errors.New("no /proc/self/exe")
	sup.Executable = func() (string, error) { return "", missing }
	_, err = sup.Start(context.Background(), fakeEntry(t, "s", "ok"), StartOptions{})
	require.ErrorIs(t, err, missing)
	require.ErrorContains(t, err, "cannot find the govllm binary")
}

// syncBuffer is a bytes.Buffer that the server's output copier and the test may share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// TestRun: a foreground server in its own process group with a pid file while it runs; the
// end of ctx stops it (SIGTERM), and its exit status is Run's.
func TestRun(t *testing.T) {
	t.Parallel()
	sup := testSupervisor(t)
	e := fakeEntry(t, "f", "ok")
	st, err := sup.State("f")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out syncBuffer
	code, err := sup.Run(ctx, e, StartOptions{Stderr: &out, Started: func(inst Instance) {
		require.False(t, inst.Detached)
		pgid, err := syscall.Getpgid(inst.PID)
		require.NoError(t, err)
		require.Equal(t, inst.PID, pgid, "its own process group: a Ctrl-C reaches it once, through Run")
		ps, err := st.Probe()
		require.NoError(t, err)
		require.True(t, ps.Running)
		go func() { // once it serves (its signal handler is set), end ctx
			_ = waitListening(e.Port)
			cancel()
		}()
	}})
	require.NoError(t, err)
	require.Equal(t, 0, code)
	require.Contains(t, out.String(), "fake serve: stopped")
	require.NoFileExists(t, st.PIDFile())

	code, err = sup.Run(context.Background(), fakeEntry(t, "g", "fail"), StartOptions{Stderr: &out})
	require.NoError(t, err)
	require.Equal(t, 1, code)
	require.Contains(t, out.String(), "boom")
}

// TestRunForwardsSignals: a SIGTERM to this process reaches the foreground server, once. Not
// parallel: the signal is this whole test process's.
func TestRunForwardsSignals(t *testing.T) {
	sup := testSupervisor(t)
	e := fakeEntry(t, "f", "ok")
	var out syncBuffer
	code, err := sup.Run(context.Background(), e, StartOptions{Stderr: &out, Started: func(Instance) {
		go func() {
			if waitListening(e.Port) == nil {
				_ = syscall.Kill(os.Getpid(), syscall.SIGTERM)
			}
		}()
	}})
	require.NoError(t, err)
	require.Equal(t, 0, code, out.String())
	require.Contains(t, out.String(), "fake serve: stopped")
}

// waitListening waits up to 30 s for something to accept on 127.0.0.1:port.
func waitListening(port int) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err == nil {
			return c.Close()
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestCheckPort(t *testing.T) {
	t.Parallel()
	sup := testSupervisor(t)
	e := fakeEntry(t, "t", "ok")
	require.NoError(t, sup.CheckPort(e, nil))

	ln, err := net.Listen("tcp", net.JoinHostPort(e.Host, strconv.Itoa(e.Port)))
	require.NoError(t, err)
	defer ln.Close()
	err = sup.CheckPort(e, nil)
	require.ErrorIs(t, err, ErrPortInUse)
	require.ErrorIs(t, err, syscall.EADDRINUSE)
	require.ErrorContains(t, err, "port "+strconv.Itoa(e.Port)+" on 127.0.0.1 is in use by another process (bind: address already in use)")
	require.ErrorContains(t, err, "`govllm server start t --port N` for this run")

	// A registered server that runs there is named; one whose pid file is stale is not, and
	// its files are left alone.
	url := "http://127.0.0.1:" + strconv.Itoa(e.Port)
	holder := startProc(t, "sleep", "60")
	for name, inst := range map[string]Instance{
		"s":     {PID: holder.Process.Pid, URL: url, Args: []string{"60"}},
		"stale": {PID: 1 << 22, URL: url, Args: []string{"serve"}},
	} {
		st, err := sup.State(name)
		require.NoError(t, err)
		require.NoError(t, st.Write(inst))
	}
	others := []registry.Entry{{Name: "remote", EndpointURL: url}, {Name: "stale", Port: e.Port}, {Name: "s", Port: 1}, e}
	err = sup.CheckPort(e, others)
	require.ErrorIs(t, err, ErrPortInUse)
	require.ErrorContains(t, err, "is in use by server s (pid "+strconv.Itoa(holder.Process.Pid)+"; `govllm server stop s` stops it)")
	stale, err := sup.State("stale")
	require.NoError(t, err)
	require.FileExists(t, stale.PIDFile())
}

func TestShellJoin(t *testing.T) {
	t.Parallel()
	require.Equal(t, `serve --model '/m/my model' --x '' 'it'\''s'`, ShellJoin([]string{"serve", "--model", "/m/my model", "--x", "", "it's"}))
}
