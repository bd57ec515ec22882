package test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/bench"
	"github.com/govllm/govllm/supervise"
	"github.com/govllm/govllm/test/internal/govtest"
)

// govllmCLI runs the built binary with args and env (added to this process's), returning its
// stdout, stderr and exit code.
func govllmCLI(t *testing.T, ctx context.Context, env []string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Dir = tmp
	var out, errw bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errw
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else {
		require.NoError(t, err)
	}
	return out.String(), errw.String(), code
}

// benchJSON runs govllm bench --json and decodes the report.
func benchJSON(t *testing.T, ctx context.Context, env []string, args ...string) (bench.Report, string, int) {
	t.Helper()
	out, errOut, code := govllmCLI(t, ctx, env, append([]string{"bench", "--json"}, args...)...)
	var rep bench.Report
	require.NoError(t, json.Unmarshal([]byte(out), &rep), "stdout: %s\nstderr: %s", out, errOut)
	return rep, errOut, code
}

// requireConsistentResult checks that one request's numbers agree with each other.
func requireConsistentResult(t *testing.T, scenario string, r bench.Result) {
	t.Helper()
	where := fmt.Sprintf("%s request %d (%s)", scenario, r.Index, r.Label)
	require.True(t, r.Success, "%s: %s", where, r.Error)
	require.Empty(t, r.Error, where)
	require.Equal(t, 200, r.HTTPStatus, where)
	require.Equal(t, "usage", r.OutputTokensFrom, where)
	require.Positive(t, r.OutputTokens, where)
	require.Positive(t, r.PromptTokens, where)
	require.Positive(t, r.E2EL, where)
	require.LessOrEqual(t, r.TTFT, r.E2EL, "%s: TTFT ≤ E2EL", where)
	require.InDelta(t, float64(r.OutputTokens)/r.E2EL, r.TokensPerS, 1e-6, "%s: tokens/s = tokens ÷ time", where)
	require.NotEmpty(t, r.FinishReason, where)
	require.NotEmpty(t, r.Text, where)
	if !r.Stream {
		require.Zero(t, r.Chunks, where)
		return
	}
	require.True(t, r.Done, "%s: ended with [DONE]", where)
	require.Positive(t, r.TTFT, where)
	require.Len(t, r.ITL, r.ContentChunks-1, "%s: one gap per content chunk after the first", where)
	var itlSum float64
	for _, gap := range r.ITL {
		require.GreaterOrEqual(t, gap, 0.0, where)
		itlSum += gap
	}
	require.LessOrEqual(t, r.TTFT+itlSum, r.E2EL+1e-9, "%s: the last content chunk comes before the end", where)
	// govllm: content chunks, then one chunk with finish_reason and one with usage.
	require.GreaterOrEqual(t, r.Chunks, r.ContentChunks+2, where)
	// govllm sends one token per chunk unless the reader falls behind.
	require.LessOrEqual(t, r.ContentChunks, r.OutputTokens, where)
	if r.OutputTokens > 1 {
		require.InDelta(t, (r.E2EL-r.TTFT)/float64(r.OutputTokens-1), r.TPOT, 1e-9, "%s: TPOT", where)
	}
}

func scenarioByName(t *testing.T, rep bench.Report, name string) bench.ScenarioResult {
	t.Helper()
	for _, s := range rep.Scenarios {
		if s.Scenario == name {
			return s
		}
	}
	t.Fatalf("no scenario %s in the report", name)
	return bench.ScenarioResult{}
}

func checkOf(t *testing.T, s bench.ScenarioResult, name string) bench.Check {
	t.Helper()
	for _, c := range s.Checks {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("scenario %s has no check %q: %+v", s.Scenario, name, s.Checks)
	return bench.Check{}
}

// TestBenchScenarios runs every scenario of govllm bench against the shared govllm server
// (default model, transformers) and checks that the numbers agree with each other and with
// the stream itself.
func TestBenchScenarios(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	const maxTokens, longTokens, loadPrompts = 12, 24, 8
	rep, errOut, code := benchJSON(t, ctx, nil, "--url", binURL, "--scenario", "all", "--max-tokens", fmt.Sprint(maxTokens),
		"--long-max-tokens", fmt.Sprint(longTokens), "--requests", "2", "--num-prompts", fmt.Sprint(loadPrompts),
		"--concurrency", "4", "--ignore-eos")
	require.Equal(t, 0, code, "stderr: %s\nreport: %+v", errOut, rep)
	require.True(t, rep.OK)
	require.Equal(t, "govllm bench", rep.Tool)
	require.Equal(t, binURL, rep.URL)
	require.Equal(t, "SmolLM2-135M-Instruct", rep.Model, "the first id of /v1/models")
	require.Len(t, rep.Scenarios, len(bench.Scenarios))

	for _, sc := range rep.Scenarios {
		require.True(t, sc.OK, "%s: %+v", sc.Scenario, sc.Checks)
		require.NotEmpty(t, sc.Requests, sc.Scenario)
		var out, in, chunks, content int
		for _, r := range sc.Requests {
			requireConsistentResult(t, sc.Scenario, r)
			require.LessOrEqual(t, r.OutputTokens, max(maxTokens, longTokens), sc.Scenario)
			out += r.OutputTokens
			in += r.PromptTokens
			chunks += r.Chunks
			content += r.ContentChunks
		}
		s := sc.Summary
		require.Equal(t, len(sc.Requests), s.Completed, sc.Scenario)
		require.Zero(t, s.Failed, sc.Scenario)
		require.Empty(t, s.Errors, sc.Scenario)
		require.Equal(t, out, s.TotalOutputTokens, sc.Scenario)
		require.Equal(t, in, s.TotalInputTokens, sc.Scenario)
		require.Equal(t, chunks, s.TotalChunks, sc.Scenario)
		require.Equal(t, content, s.TotalContentChunks, sc.Scenario)
		require.Positive(t, s.Duration, sc.Scenario)
		require.InDelta(t, float64(out)/s.Duration, s.OutputThroughput, 1e-6, sc.Scenario)
		require.InDelta(t, float64(in+out)/s.Duration, s.TotalTokenThroughput, 1e-6, sc.Scenario)
		require.InDelta(t, float64(s.Completed)/s.Duration, s.RequestThroughput, 1e-6, sc.Scenario)
		// Latencies are ordered: p50 ≤ p90 ≤ p99, mean TTFT ≤ mean E2EL.
		for _, d := range []bench.Dist{s.TTFT(), s.TPOT(), s.ITL(), s.E2EL()} {
			require.LessOrEqual(t, d.P50, d.P90, sc.Scenario)
			require.LessOrEqual(t, d.P90, d.P99, sc.Scenario)
			require.Equal(t, d.P50, d.Median, sc.Scenario)
		}
		require.LessOrEqual(t, s.MeanTTFTMs, s.MeanE2ELMs, sc.Scenario)
		// The longest request ends within the run.
		require.LessOrEqual(t, s.P99E2ELMs, s.Duration*1000+1e-6, sc.Scenario)
	}

	basic := scenarioByName(t, rep, bench.Basic)
	require.Len(t, basic.Requests, 2)
	for _, r := range basic.Requests {
		require.False(t, r.Stream)
	}
	stream := scenarioByName(t, rep, bench.Stream)
	require.Len(t, stream.Requests, 2)
	require.Positive(t, stream.Summary.MeanTTFTMs)
	require.Positive(t, stream.Summary.MeanITLMs)
	require.Positive(t, stream.Summary.MeanTPOTMs)

	cmp := scenarioByName(t, rep, bench.Compare)
	require.True(t, checkOf(t, cmp, "same text").OK, "greedy: the same text streamed and not: %+v", cmp.Checks)
	require.True(t, checkOf(t, cmp, "same output tokens").OK)
	require.Contains(t, cmp.Requests[0].Text, "Paris")

	mt := scenarioByName(t, rep, bench.MultiTurn)
	require.Len(t, mt.Requests, 3)
	require.True(t, checkOf(t, mt, "context kept").OK)
	for i := 1; i < 3; i++ {
		require.Greater(t, mt.Requests[i].PromptTokens, mt.Requests[i-1].PromptTokens+mt.Requests[i-1].OutputTokens/2,
			"turn %d carries the earlier turns", i+1)
	}

	temp := scenarioByName(t, rep, bench.Temperature)
	require.Len(t, temp.Requests, 4)
	require.True(t, checkOf(t, temp, "temperature 0 repeats itself").OK)

	long := scenarioByName(t, rep, bench.Long)
	require.Equal(t, longTokens, long.Requests[0].OutputTokens, "--ignore-eos: to max_tokens")
	require.Equal(t, "length", long.Requests[0].FinishReason)

	require.Len(t, scenarioByName(t, rep, bench.RapidFire).Requests, 2)

	sys := scenarioByName(t, rep, bench.System)
	require.Len(t, sys.Requests, 2)
	for _, c := range sys.Checks {
		if strings.HasPrefix(c.Name, "system prompt honoured") {
			require.True(t, c.Advisory, "a 135M model may not follow a system prompt: reported, not asserted")
		}
	}

	load := scenarioByName(t, rep, bench.Load)
	require.Len(t, load.Requests, loadPrompts)
	require.Equal(t, loadPrompts*maxTokens, load.Summary.TotalOutputTokens, "--ignore-eos: fixed lengths")
	require.Equal(t, map[string]int{"length": loadPrompts}, load.Summary.FinishReasons)
	require.Equal(t, "inf", load.Config.RequestRate)
	require.Equal(t, 4, load.Config.MaxConcurrency)
	require.True(t, load.Config.IgnoreEOS)
	require.GreaterOrEqual(t, load.Summary.MaxConcurrentRequests, 2)

	// The chunk counts are those of the stream: the same greedy request, read raw.
	ours := cmp.Requests[0]
	body := fmt.Sprintf(`{"model":"SmolLM2-135M-Instruct","messages":[{"role":"user","content":"What is the capital of France?"}],
		"stream":true,"max_tokens":%d,"temperature":0,"seed":0,"stream_options":{"include_usage":true}}`, maxTokens)
	lines := sse(t, ctx, body)
	require.Equal(t, "[DONE]", lines[len(lines)-1])
	var text strings.Builder
	contentChunks := 0
	for _, l := range lines[:len(lines)-1] {
		var c chunk
		require.NoError(t, json.Unmarshal([]byte(l), &c))
		for _, ch := range c.Choices {
			if ch.Delta.Content != nil && *ch.Delta.Content != "" {
				contentChunks++
				text.WriteString(*ch.Delta.Content)
			}
		}
	}
	require.Equal(t, text.String(), ours.Text)
	require.Equal(t, len(lines)-1, ours.Chunks, "chunks: every data event before [DONE]")
	require.Equal(t, contentChunks, ours.ContentChunks, "content chunks: the deltas with text")
}

// TestBenchTextReport: the human report against govllm.
func TestBenchTextReport(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	out, errOut, code := govllmCLI(t, ctx, nil, "bench", "--url", binURL, "--scenario", "stream", "--requests", "1", "--max-tokens", "8")
	require.Equal(t, 0, code, errOut)
	require.Contains(t, out, "govllm bench: "+binURL+", model SmolLM2-135M-Instruct")
	require.Contains(t, out, "=== stream:")
	require.Contains(t, out, "TTFT (ms)")
	require.Contains(t, out, "ok   requests succeeded: 1 of 1 succeeded")
	require.Contains(t, out, "PASS: 1 scenarios")
}

// TestBenchDroppedStream: a server that drops the stream without [DONE] is reported as an
// error, not a success; so is a 500.
func TestBenchDroppedStream(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/v1/models":
			fmt.Fprint(w, `{"data":[{"id":"m"}]}`)
		case strings.Contains(r.Header.Get("Accept"), "event-stream"):
			w.Header().Set("Content-Type", "text/event-stream")
			fmt.Fprint(w, "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Par\"},\"finish_reason\":null}]}\n\n")
			fmt.Fprint(w, "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"is\"},\"finish_reason\":null}]}\n\n")
			// The handler returns: the stream ends without a finish_reason or [DONE].
		default:
			w.WriteHeader(http.StatusInternalServerError)
			fmt.Fprint(w, `{"error":{"message":"engine dead","type":"InternalServerError","param":null,"code":500}}`)
		}
	}))
	defer srv.Close()
	rep, _, code := benchJSON(t, ctx, nil, "--url", srv.URL, "--scenario", "stream,basic", "--requests", "1")
	require.Equal(t, 1, code)
	require.False(t, rep.OK)
	st := rep.Scenarios[0]
	require.False(t, st.OK)
	require.False(t, st.Requests[0].Success)
	require.False(t, st.Requests[0].Done)
	require.Equal(t, 2, st.Requests[0].ContentChunks)
	require.Contains(t, st.Requests[0].Error, "stream ended without data: [DONE] after 2 chunks")
	require.Equal(t, 1, st.Summary.Failed)
	require.Zero(t, st.Summary.Completed)
	b := rep.Scenarios[1]
	require.False(t, b.OK)
	require.Equal(t, "HTTP 500 Internal Server Error: engine dead", b.Requests[0].Error)
	require.Equal(t, 500, b.Requests[0].HTTPStatus)
}

// TestBenchServerRegistry: server add, start --detach, bench by name and stop, end to end on
// the default model in a temporary XDG config and state directory; and the messages of bad
// entries.
func TestBenchServerRegistry(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 6*time.Minute)
	defer cancel()
	config, state := t.TempDir(), t.TempDir()
	env := []string{"XDG_CONFIG_HOME=" + config, "XDG_STATE_HOME=" + state}
	cli := func(args ...string) (string, string, int) { return govllmCLI(t, ctx, env, args...) }

	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	port := l.Addr().(*net.TCPAddr).Port
	require.NoError(t, l.Close())
	out, errOut, code := cli("server", "add", "smol", "--model", defaultModel(), "--engine", "transformers",
		"--python", govtest.VenvPython(), "--port", fmt.Sprint(port), "--", "--device", device, "--dtype", dtype)
	require.Equal(t, 0, code, errOut)
	require.Contains(t, out, "added server smol")
	require.FileExists(t, filepath.Join(config, "govllm", "servers.json"))

	// Bad entries name their fix.
	_, errOut, code = cli("server", "add", "bad", "--model", defaultModel(), "--engine", "tgi")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, `unknown engine "tgi": use --engine auto, vllm, transformers`)
	_, errOut, code = cli("server", "add", "bad", "--model", filepath.Join(tmp, "no-model"))
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "does not exist: pass --model DIR")
	require.Contains(t, errOut, "scripts/bootstrap")
	busyPort := mustPort(t, binURL)
	_, _, code = cli("server", "add", "busy", "--model", defaultModel(), "--port", busyPort)
	require.Equal(t, 0, code)
	_, errOut, code = cli("server", "start", "busy", "--detach")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "port "+busyPort+" on 127.0.0.1 is in use by another process")
	require.Contains(t, errOut, "`govllm server start busy --port N`")

	out, errOut, code = cli("server", "start", "smol", "--detach", "--wait", "5m")
	stateDir := filepath.Join(state, "govllm", "smol")
	t.Cleanup(func() {
		// Whatever happened, leave no server behind.
		st := supervise.State{Dir: stateDir}
		if ps, _ := st.Probe(); ps.Running {
			_, _ = supervise.Stop(ps.PID, time.Minute)
		}
	})
	require.Equal(t, 0, code, "stdout: %s\nstderr: %s", out, errOut)
	url := fmt.Sprintf("http://127.0.0.1:%d", port)
	require.Contains(t, out, "server smol is ready at "+url)
	pidFile := filepath.Join(stateDir, "server.pid")
	require.FileExists(t, pidFile)
	inst, err := supervise.State{Dir: stateDir}.Probe()
	require.NoError(t, err)
	require.True(t, inst.Running)

	out, _, code = cli("server", "list")
	require.Equal(t, 0, code)
	require.Regexp(t, fmt.Sprintf(`smol\s+running \(pid %d\)\s+%s\s+transformers`, inst.PID, url), out)

	rep, errOut, code := benchJSON(t, ctx, env, "smol", "--scenario", "basic,stream", "--requests", "1", "--max-tokens", "8")
	require.Equal(t, 0, code, errOut)
	require.True(t, rep.OK)
	require.Equal(t, "smol", rep.Server)
	require.Equal(t, url, rep.URL)
	for _, sc := range rep.Scenarios {
		for _, r := range sc.Requests {
			requireConsistentResult(t, sc.Scenario, r)
		}
	}

	out, errOut, code = cli("server", "stop", "smol")
	require.Equal(t, 0, code, errOut)
	require.Equal(t, fmt.Sprintf("stopped server smol (pid %d)\n", inst.PID), out)
	require.NoFileExists(t, pidFile)
	require.False(t, supervise.Alive(inst.PID))
	log, err := os.ReadFile(filepath.Join(stateDir, "server.log"))
	require.NoError(t, err)
	require.Contains(t, string(log), "govllm: serving")
	require.Contains(t, string(log), "govllm: drained", "SIGTERM: a graceful shutdown")
	_, err = http.Get(url + "/health")
	require.Error(t, err, "nothing listens any more")

	out, _, code = cli("server", "rm", "smol")
	require.Equal(t, 0, code)
	require.Equal(t, "removed server smol\n", out)
}

// mustPort is the port of a URL.
func mustPort(t *testing.T, raw string) string {
	t.Helper()
	u, err := url.Parse(raw)
	require.NoError(t, err)
	return u.Port()
}
