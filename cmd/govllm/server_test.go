package main

import (
	"bytes"
	"encoding/json"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/govllm/govllm/bench"
)

// cli runs govllm with args in this process.
func cli(args ...string) (stdout, stderr string, code int) {
	var out, errw bytes.Buffer
	code = run(args, &out, &errw)
	return out.String(), errw.String(), code
}

// xdg points the registry and the state at temporary directories for one test.
func xdg(t *testing.T) (config, state string) {
	t.Helper()
	config, state = t.TempDir(), t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", config)
	t.Setenv("XDG_STATE_HOME", state)
	return config, state
}

// modelDir is a directory that passes for a checkpoint.
func modelDir(t *testing.T) string {
	t.Helper()
	d := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(d, "config.json"), []byte(`{}`), 0o644))
	return d
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func TestServerAddListShowRemove(t *testing.T) {
	config, state := xdg(t)
	model := modelDir(t)
	out, errOut, code := cli("server", "add", "a", "--model", model, "--engine", "transformers")
	require.Equal(t, 0, code, errOut)
	require.Contains(t, out, "added server a: "+model+", engine transformers, on http://127.0.0.1:8000; start it with `govllm server start a --detach`")
	// Flags after the name, and serve flags after --.
	_, errOut, code = cli("server", "add", "b", "--model", model, "--engine", "vllm", "--tensor-parallel", "2", "--port", "9100",
		"--gpus", "0,1", "--", "--max-model-len", "4096")
	require.Equal(t, 0, code, errOut)
	out, errOut, code = cli("server", "add", "--endpoint-url", "http://gpu-box:8000/v1", "remote")
	require.Equal(t, 0, code, errOut)
	require.Contains(t, out, "added remote server remote at http://gpu-box:8000")
	require.FileExists(t, filepath.Join(config, "govllm", "servers.json"))

	_, errOut, code = cli("server", "add", "a", "--model", model)
	require.Equal(t, 1, code)
	require.Contains(t, errOut, `"a" is already registered`)
	require.Contains(t, errOut, "pass --replace")

	out, _, code = cli("server", "list")
	require.Equal(t, 0, code)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	require.Len(t, lines, 4)
	require.Regexp(t, `^NAME\s+STATUS\s+URL\s+ENGINE\s+TP\s+MODEL$`, lines[0])
	require.Regexp(t, `^a\s+stopped\s+http://127\.0\.0\.1:8000\s+transformers\s+-\s+`+model+`$`, lines[1])
	require.Regexp(t, `^b\s+stopped\s+http://127\.0\.0\.1:9100\s+vllm\s+2\s+`, lines[2])
	require.Regexp(t, `^remote\s+remote\s+http://gpu-box:8000\s+-\s+-\s+-$`, lines[3])

	out, _, code = cli("server", "list", "--json")
	require.Equal(t, 0, code)
	var list []serverStatus
	require.NoError(t, json.Unmarshal([]byte(out), &list))
	require.Len(t, list, 3)
	require.Equal(t, "stopped", list[0].Status)
	require.Equal(t, "remote", list[2].Status)
	require.Equal(t, filepath.Join(state, "govllm", "a", "server.pid"), list[0].PIDFile)

	out, _, code = cli("server", "show", "b")
	require.Equal(t, 0, code)
	require.Contains(t, out, "govllm serve --host 127.0.0.1 --port 9100 --model "+model+
		" --engine vllm --tensor-parallel-size 2 --gpus 0,1 --max-model-len 4096")
	require.Contains(t, out, filepath.Join(state, "govllm", "b", "server.log"))

	out, _, code = cli("server", "rm", "a")
	require.Equal(t, 0, code)
	require.Equal(t, "removed server a\n", out)
	_, errOut, code = cli("server", "rm", "a")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, `no such server "a": add it with `+"`govllm server add a --model DIR`")
	_, errOut, code = cli("server", "show", "nope")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "govllm server list")
}

// TestServerAddBadEntries: each mistake gets a message that names the fix.
func TestServerAddBadEntries(t *testing.T) {
	xdg(t)
	model := modelDir(t)
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"unknown engine", []string{"x", "--model", model, "--engine", "tgi"}, 1,
			`unknown engine "tgi": use --engine auto, vllm, transformers`},
		{"missing model dir", []string{"x", "--model", "/no/such/model"}, 1,
			"model directory /no/such/model does not exist: pass --model DIR (a Hugging Face checkpoint directory), or run scripts/bootstrap"},
		{"not a checkpoint", []string{"x", "--model", t.TempDir()}, 1, "has no config.json"},
		{"tensor parallel on transformers", []string{"x", "--model", model, "--engine", "transformers", "--tensor-parallel", "2"}, 1,
			"tensor and pipeline parallelism need --engine vllm"},
		{"a serve flag that serve refuses", []string{"x", "--model", model, "--", "--device", "tpu"}, 1,
			`launch: bad options: --device "tpu": use cpu or cuda`},
		{"an unknown serve flag", []string{"x", "--model", model, "--", "--no-such-flag"}, 1,
			"serve flags: flag provided but not defined: -no-such-flag"},
		{"remote with a model", []string{"x", "--endpoint-url", "http://h:8000", "--model", model}, 1, "drop --model"},
		{"bad url", []string{"x", "--endpoint-url", "h:8000"}, 1, "want http://HOST[:PORT]"},
		{"bad name", []string{"a b", "--model", model}, 1, "server name"},
		{"no name", []string{"--model", model}, 2, "want one server name"},
		{"two names", []string{"a", "b"}, 2, "want one server name"},
		{"unknown flag", []string{"a", "--modle", model}, 2, "flag provided but not defined: -modle"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, errOut, code := cli(append([]string{"server", "add"}, tc.args...)...)
			require.Equal(t, tc.code, code, errOut)
			require.Contains(t, errOut, tc.want)
		})
	}
	out, _, _ := cli("server", "list")
	require.Contains(t, out, "no servers in")
}

func TestBenchCommand(t *testing.T) {
	defer goleak.VerifyNone(t)
	ok := httptest.NewServer(fakeOpenAI(""))
	defer ok.Close()
	drop := httptest.NewServer(fakeOpenAI("drop"))
	defer drop.Close()
	fail := httptest.NewServer(fakeOpenAI("500"))
	defer fail.Close()

	out, errOut, code := cli("bench", "--url", ok.URL+"/v1", "--scenario", "basic,stream,compare", "--max-tokens", "4")
	require.Equal(t, 0, code, errOut)
	require.Contains(t, out, "govllm bench: "+ok.URL+", model fake-model")
	require.Contains(t, out, "PASS: 3 scenarios")
	require.Empty(t, errOut, "no progress bar when stderr is not a terminal")

	out, _, code = cli("bench", "--url", drop.URL, "--scenario", "stream", "--requests", "2", "--json")
	require.Equal(t, 1, code, "a dropped stream fails the run")
	var rep bench.Report
	require.NoError(t, json.Unmarshal([]byte(out), &rep))
	require.False(t, rep.OK)
	sc := rep.Scenarios[0]
	require.Equal(t, 2, sc.Summary.Failed)
	require.Zero(t, sc.Summary.Completed)
	require.Contains(t, sc.Requests[0].Error, "stream ended without data: [DONE]")
	require.False(t, sc.Requests[0].Success)

	out, _, code = cli("bench", "--url", fail.URL, "--scenario", "basic", "--requests", "1")
	require.Equal(t, 1, code)
	require.Contains(t, out, "request 0 failed: HTTP 500 Internal Server Error: the engine died")
	require.Contains(t, out, "FAIL: 1 of 1 scenarios failed: basic")

	out, _, code = cli("bench", "--url", ok.URL, "--scenario", "load", "--concurrency", "2", "--num-prompts", "6", "--max-tokens", "4", "--json")
	require.Equal(t, 0, code)
	require.NoError(t, json.Unmarshal([]byte(out), &rep))
	require.Equal(t, 6, rep.Scenarios[0].Summary.Completed)
	require.Equal(t, 24, rep.Scenarios[0].Summary.TotalOutputTokens)

	_, errOut, code = cli("bench", "--url", "http://127.0.0.1:1", "--scenario", "basic")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "connection refused (is the server running? pass --model NAME if it has no /v1/models)")

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--scenario", "warp"}, `unknown scenario "warp"`},
		{[]string{"--endpoint", "responses"}, `--endpoint "responses": use chat or completions`},
		{[]string{"--request-rate", "fast"}, "want requests per second > 0, or inf"},
		{[]string{"--request-rate", "inf", "--duration", "1s", "--scenario", "load"}, "needs --concurrency"},
		{[]string{"--temperature", "-1"}, "want a number ≥ 0"},
		{[]string{"a", "b"}, "want at most one server name"},
		{[]string{"a", "--url", ok.URL}, "not both"},
	} {
		_, errOut, code := cli(append([]string{"bench"}, tc.args...)...)
		require.Equal(t, 2, code, "%v: %s", tc.args, errOut)
		require.Contains(t, errOut, tc.want, tc.args)
	}
	xdg(t)
	_, errOut, code = cli("bench", "nope")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, `no such server "nope"`)
}
