package main

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/govllm/govllm/bench"
	"github.com/govllm/govllm/supervise"
)

// fakeServer makes `server start` run a fake `govllm serve` in mode: the binary it runs is
// os.Executable's, this test binary, which the mode makes a fake (see TestMain).
func fakeServer(t *testing.T, mode string) {
	t.Helper()
	t.Setenv(fakeServeEnv, mode)
}

func TestServerStartStopDetached(t *testing.T) {
	_, state := xdg(t)
	fakeServer(t, "ok")
	model := modelDir(t)
	port := freePort(t)
	_, errOut, code := cli("server", "add", "s", "--model", model, "--port", strconv.Itoa(port))
	require.Equal(t, 0, code, errOut)

	out, errOut, code := cli("server", "start", "s", "--detach", "--wait", "30s")
	require.Equal(t, 0, code, errOut)
	url := "http://127.0.0.1:" + strconv.Itoa(port)
	require.Contains(t, out, "server s is ready at "+url)
	st := supervise.State{Dir: filepath.Join(state, "govllm", "s")}
	inst, err := st.Probe()
	require.NoError(t, err)
	require.True(t, inst.Running)
	require.True(t, inst.Detached)
	require.Equal(t, url, inst.URL)
	sid, err := unix.Getsid(inst.PID)
	require.NoError(t, err)
	require.Equal(t, inst.PID, sid, "detached: its own session")
	log, err := os.ReadFile(st.LogFile())
	require.NoError(t, err)
	require.Contains(t, string(log), "fake serve: [--host 127.0.0.1 --port "+strconv.Itoa(port))

	out, _, _ = cli("server", "list", "--json")
	var list []serverStatus
	require.NoError(t, json.Unmarshal([]byte(out), &list))
	require.Equal(t, "running", list[0].Status)
	require.Equal(t, inst.PID, list[0].PID)

	// bench by name reaches it.
	out, errOut, code = cli("bench", "s", "--scenario", "basic,stream", "--max-tokens", "4", "--json")
	require.Equal(t, 0, code, errOut)
	var rep bench.Report
	require.NoError(t, json.Unmarshal([]byte(out), &rep))
	require.Equal(t, "s", rep.Server)
	require.Equal(t, url, rep.URL)
	require.Equal(t, "fake-model", rep.Model)
	require.True(t, rep.OK)

	_, errOut, code = cli("server", "start", "s", "--detach")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "server s is already running (pid "+strconv.Itoa(inst.PID))

	// Another entry on the same port: the message names the holder and the fix.
	_, errOut, code = cli("server", "add", "t", "--model", model, "--port", strconv.Itoa(port))
	require.Equal(t, 0, code)
	require.Contains(t, errOut, "server s uses port "+strconv.Itoa(port)+" too")
	_, errOut, code = cli("server", "start", "t", "--detach")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "port "+strconv.Itoa(port)+" on 127.0.0.1 is in use by server s (pid "+strconv.Itoa(inst.PID)+
		"; `govllm server stop s` stops it)")
	require.Contains(t, errOut, "`govllm server start t --port N`")
	_, errOut, code = cli("server", "rm", "s")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "`govllm server stop s` first")

	out, errOut, code = cli("server", "stop", "s")
	require.Equal(t, 0, code, errOut)
	require.Equal(t, "stopped server s (pid "+strconv.Itoa(inst.PID)+")\n", out)
	require.NoFileExists(t, st.PIDFile())
	require.False(t, supervise.Alive(inst.PID))
	log, _ = os.ReadFile(st.LogFile())
	require.Contains(t, string(log), "fake serve: stopped", "SIGTERM: a clean exit")
	out, _, code = cli("server", "stop", "s")
	require.Equal(t, 0, code)
	require.Equal(t, "server s is not running\n", out)

	// A stale pid file (the process is gone).
	require.NoError(t, st.Write(supervise.Instance{PID: inst.PID, Args: []string{"serve"}}))
	out, _, code = cli("server", "stop", "s")
	require.Equal(t, 0, code)
	require.Contains(t, out, "removed its stale pid file")
	require.NoFileExists(t, st.PIDFile())
	require.NoError(t, st.Write(supervise.Instance{PID: inst.PID, Args: []string{"serve"}}))
	out, errOut, code = cli("server", "start", "s", "--detach", "--port", strconv.Itoa(freePort(t)))
	require.Equal(t, 0, code, errOut)
	require.Contains(t, errOut, "removed the stale pid file of s")
	require.Contains(t, out, "is ready")
	_, _, code = cli("server", "stop", "s")
	require.Equal(t, 0, code)
}

func TestServerStopKillsAfterTimeout(t *testing.T) {
	xdg(t)
	fakeServer(t, "ignore-term")
	_, _, code := cli("server", "add", "s", "--model", modelDir(t), "--port", strconv.Itoa(freePort(t)))
	require.Equal(t, 0, code)
	_, errOut, code := cli("server", "start", "s", "--detach", "--wait", "30s")
	require.Equal(t, 0, code, errOut)
	start := time.Now()
	out, errOut, code := cli("server", "stop", "s", "--timeout", "500ms")
	require.Equal(t, 0, code, errOut)
	require.Contains(t, out, "did not exit within 500ms of SIGTERM: killed")
	require.GreaterOrEqual(t, time.Since(start), 500*time.Millisecond)
}

func TestServerStartFails(t *testing.T) {
	_, state := xdg(t)
	fakeServer(t, "fail")
	_, _, code := cli("server", "add", "s", "--model", modelDir(t), "--port", strconv.Itoa(freePort(t)))
	require.Equal(t, 0, code)
	_, errOut, code := cli("server", "start", "s", "--detach", "--wait", "30s")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "server s did not become healthy: it exited (exit status 1)")
	require.Contains(t, errOut, "govllm serve: boom: cannot import vllm", "the log's tail")
	require.NoFileExists(t, filepath.Join(state, "govllm", "s", "server.pid"))

	// The model went away after add.
	model := modelDir(t)
	_, _, code = cli("server", "add", "gone", "--model", model)
	require.Equal(t, 0, code)
	require.NoError(t, os.RemoveAll(model))
	_, errOut, code = cli("server", "start", "gone")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "does not exist: pass --model DIR")

	_, _, code = cli("server", "add", "r", "--endpoint-url", "http://h:1")
	require.Equal(t, 0, code)
	_, errOut, code = cli("server", "start", "r")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "server r is remote (http://h:1): govllm cannot start it")
	_, errOut, code = cli("server", "stop", "r")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "govllm does not run it")
}

// TestServerStartForeground: the server runs attached; a SIGTERM to govllm reaches it.
func TestServerStartForeground(t *testing.T) {
	_, state := xdg(t)
	fakeServer(t, "ok")
	port := freePort(t)
	_, _, code := cli("server", "add", "f", "--model", modelDir(t), "--port", strconv.Itoa(port))
	require.Equal(t, 0, code)
	st := supervise.State{Dir: filepath.Join(state, "govllm", "f")}
	type result struct {
		out, errOut string
		code        int
	}
	done := make(chan result, 1)
	go func() {
		out, errOut, code := cli("server", "start", "f")
		done <- result{out, errOut, code}
	}()
	var inst supervise.Status
	require.Eventually(t, func() bool {
		i, err := st.Probe()
		inst = i
		return err == nil && i.Running
	}, 30*time.Second, 20*time.Millisecond)
	require.False(t, inst.Detached)
	pgid, err := syscall.Getpgid(inst.PID)
	require.NoError(t, err)
	require.Equal(t, inst.PID, pgid, "its own process group: a Ctrl-C reaches it once, through govllm")
	require.Eventually(t, func() bool { // serving, so its signal handler is set
		resp, err := http.Get(inst.URL + "/health")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil
	}, 30*time.Second, 20*time.Millisecond)
	// The signal goes to this process, which forwards it.
	require.NoError(t, syscall.Kill(os.Getpid(), syscall.SIGTERM))
	select {
	case r := <-done:
		require.Equal(t, 0, r.code, r.errOut)
		require.Contains(t, r.errOut, "fake serve: stopped")
	case <-time.After(30 * time.Second):
		t.Fatal("the foreground server did not stop on SIGTERM")
	}
	require.NoFileExists(t, st.PIDFile())
}
