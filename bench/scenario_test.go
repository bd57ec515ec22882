package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"math"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestParseScenarios(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
		err  string
	}{
		{in: "basic", want: []string{Basic}},
		{in: "stream, load,stream", want: []string{Stream, Load}},
		{in: "suite", want: Suite},
		{in: "all", want: append(slices.Clone(Suite), Load)},
		{in: "load,all", want: append([]string{Load}, Suite...)},
		{in: "warp", err: `unknown scenario "warp": use basic, stream, compare, multi-turn, temperature, long, rapid-fire, system, load, suite or all`},
		{in: " , ", err: "no scenario"},
	} {
		got, err := ParseScenarios(tc.in)
		if tc.err != "" {
			require.ErrorContains(t, err, tc.err, tc.in)
			continue
		}
		require.NoError(t, err, tc.in)
		require.Equal(t, tc.want, got, tc.in)
	}
}

// progress records what a Progress is told.
type progress struct {
	mu     sync.Mutex
	events []string
	done   int
}

func (p *progress) Start(s string, total int, _ time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.events = append(p.events, "start "+s)
}

func (p *progress) Done(Result) { p.mu.Lock(); p.done++; p.mu.Unlock() }

func (p *progress) Finish() { p.mu.Lock(); p.events = append(p.events, "finish"); p.mu.Unlock() }

func checkNamed(t *testing.T, sc ScenarioResult, name string) Check {
	t.Helper()
	for _, c := range sc.Checks {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("scenario %s has no check %q: %+v", sc.Scenario, name, sc.Checks)
	return Check{}
}

func TestRunSuite(t *testing.T) {
	c, f := client(t, &fake{})
	p := &progress{}
	r := &Runner{Client: c, Opts: Options{MaxTokens: 16, LongMaxTokens: 5, Progress: p, Seed: 3}}
	rep, err := r.RunAll(t.Context(), Suite)
	require.NoError(t, err)
	require.True(t, rep.OK)
	require.Len(t, rep.Scenarios, len(Suite))
	want := map[string]int{Basic: 3, Stream: 3, Compare: 2, MultiTurn: 3, Temperature: 4, Long: 1, RapidFire: 10, System: 2}
	total := 0
	for _, sc := range rep.Scenarios {
		require.True(t, sc.OK, "%s: %+v", sc.Scenario, sc.Checks)
		require.Len(t, sc.Requests, want[sc.Scenario], sc.Scenario)
		require.Equal(t, want[sc.Scenario], sc.Summary.Completed, sc.Scenario)
		require.Zero(t, sc.Summary.Failed)
		require.True(t, checkNamed(t, sc, "requests succeeded").OK)
		require.Positive(t, sc.Summary.Duration)
		for i, req := range sc.Requests {
			require.Equal(t, i, req.Index)
			requireConsistent(t, req)
		}
		total += want[sc.Scenario]
	}
	require.Equal(t, total, p.done)
	require.Len(t, p.events, 2*len(Suite))
	require.Len(t, f.requests(), total)

	byName := map[string]ScenarioResult{}
	for _, sc := range rep.Scenarios {
		byName[sc.Scenario] = sc
	}
	for _, r := range byName[Basic].Requests {
		require.False(t, r.Stream)
	}
	for _, r := range byName[Stream].Requests {
		require.True(t, r.Stream)
	}
	cmp := byName[Compare]
	require.Equal(t, []string{"stream", "non-stream"}, []string{cmp.Requests[0].Label, cmp.Requests[1].Label})
	require.True(t, checkNamed(t, cmp, "same text").OK)

	mt := byName[MultiTurn]
	require.True(t, checkNamed(t, mt, "context kept").OK, "%+v", mt.Checks)
	require.False(t, checkNamed(t, mt, "context used").OK, "the fake always answers Paris")

	temps := byName[Temperature]
	require.Equal(t, []string{"temperature 0.0", "temperature 0.0 again", "temperature 0.5", "temperature 1.0"},
		[]string{temps.Requests[0].Label, temps.Requests[1].Label, temps.Requests[2].Label, temps.Requests[3].Label})
	require.False(t, checkNamed(t, temps, "temperatures differ").OK, "advisory: the fake ignores temperature")
	require.True(t, checkNamed(t, temps, "temperatures differ").Advisory)

	long := byName[Long]
	require.Equal(t, 5, long.Requests[0].OutputTokens)
	require.Equal(t, 5, long.Config.MaxTokens)
	require.True(t, checkNamed(t, long, "ran to max_tokens").OK)

	sys := byName[System]
	require.False(t, checkNamed(t, sys, "system prompt honoured: single word").OK)
	require.True(t, sys.OK, "system prompt checks are advisory")

	// What went over the wire.
	var turns []int
	var temperatures []any
	for _, b := range f.requests() {
		msgs, _ := b["messages"].([]any)
		if strings.Contains(msgs[0].(map[string]any)["content"].(string), "Alice") {
			turns = append(turns, len(msgs))
			if len(msgs) > 1 {
				require.Equal(t, "assistant", msgs[1].(map[string]any)["role"])
				require.Equal(t, "The capital of France is Paris.", msgs[1].(map[string]any)["content"])
			}
		}
		if strings.Contains(msgs[0].(map[string]any)["content"].(string), "the sea") {
			temperatures = append(temperatures, b["temperature"])
		}
		if msgs[0].(map[string]any)["role"] == "system" {
			require.Len(t, msgs, 2)
		}
	}
	require.Equal(t, []int{1, 3, 5}, turns, "each turn carries the earlier ones")
	require.Equal(t, []any{0.0, 0.0, 0.5, 1.0}, temperatures)
}

func TestRunFailures(t *testing.T) {
	c, _ := client(t, &fake{mode: "drop"})
	r := &Runner{Client: c, Opts: Options{MaxTokens: 16, Requests: 2}}
	sc, err := r.Run(t.Context(), Stream)
	require.NoError(t, err)
	require.False(t, sc.OK)
	require.Equal(t, 2, sc.Summary.Failed)
	require.Zero(t, sc.Summary.Completed)
	ch := checkNamed(t, sc, "requests succeeded")
	require.False(t, ch.OK)
	require.Contains(t, ch.Detail, "0 of 2 succeeded: request 0: stream ended without data: [DONE]")
	require.Len(t, sc.Summary.Errors, 1)

	c5, _ := client(t, &fake{mode: "500"})
	rep, err := (&Runner{Client: c5}).RunAll(t.Context(), []string{Basic, MultiTurn})
	require.NoError(t, err)
	require.False(t, rep.OK)
	require.Len(t, rep.Scenarios[1].Requests, 1, "multi-turn stops at the first failed turn")

	_, err = r.Run(t.Context(), "nope")
	require.ErrorContains(t, err, "unknown scenario")
}

func TestRunCompletions(t *testing.T) {
	c, f := client(t, &fake{})
	r := &Runner{Client: c, Opts: Options{MaxTokens: 4, Requests: 2, Completions: true, Prompt: "Once upon a time"}}
	sc, err := r.Run(t.Context(), Stream)
	require.NoError(t, err)
	require.True(t, sc.OK, "%+v", sc.Checks)
	require.Equal(t, "/v1/completions", sc.Config.Endpoint)
	for _, b := range f.requests() {
		require.Equal(t, "Once upon a time", b["prompt"])
	}
}

func TestLoadConcurrency(t *testing.T) {
	c, f := client(t, &fake{delay: 10 * time.Millisecond})
	c.HTTP = NewHTTPClient(4)
	p := &progress{}
	r := &Runner{Client: c, Opts: Options{MaxTokens: 4, Concurrency: 4, NumPrompts: 20, Progress: p, IgnoreEOS: true}}
	sc, err := r.Run(t.Context(), Load)
	require.NoError(t, err)
	require.True(t, sc.OK, "%+v", sc.Checks)
	require.Len(t, sc.Requests, 20)
	require.Equal(t, 20, p.done)
	for i, req := range sc.Requests {
		require.Equal(t, i, req.Index, "sorted by index")
		requireConsistent(t, req)
	}
	require.EqualValues(t, 4, f.peak.Load(), "a closed loop keeps 4 requests in flight")
	require.Equal(t, Config{Endpoint: "/v1/chat/completions", MaxTokens: 4, RequestRate: "inf", MaxConcurrency: 4, NumPrompts: 20, IgnoreEOS: true}, sc.Config)
	s := sc.Summary
	require.Equal(t, 20, s.Completed)
	require.Equal(t, 80, s.TotalOutputTokens)
	require.InDelta(t, 80/s.Duration, s.OutputThroughput, 1e-9)
	require.InDelta(t, 20/s.Duration, s.RequestThroughput, 1e-9)
	require.LessOrEqual(t, s.MaxConcurrentRequests, 20)
	require.GreaterOrEqual(t, s.MaxConcurrentRequests, 4)
	for _, b := range f.requests() {
		require.Equal(t, true, b["ignore_eos"])
		require.Equal(t, true, b["stream"])
	}
}

func TestLoadRequestRate(t *testing.T) {
	c, _ := client(t, &fake{})
	starts := func(seed int64) []float64 {
		r := &Runner{Client: c, Opts: Options{MaxTokens: 2, RequestRate: 50, NumPrompts: 10, Seed: seed}}
		sc, err := r.Run(t.Context(), Load)
		require.NoError(t, err)
		require.True(t, sc.OK)
		require.Equal(t, 50.0, sc.Config.RequestRate)
		require.Zero(t, sc.Config.MaxConcurrency)
		var s []float64
		for _, req := range sc.Requests {
			s = append(s, req.StartTime)
		}
		return s
	}
	a, b := starts(1), starts(1)
	require.Len(t, a, 10)
	// Requests are dispatched in schedule order, but StartTime is taken in each request's own
	// goroutine, which a loaded machine may run late: order and equality hold up to that noise.
	// The same seed gives the same schedule; ~10 arrivals at 50/s take ~0.2 s.
	const noise = 0.25
	for i := range a {
		if i > 0 {
			require.GreaterOrEqual(t, a[i], a[i-1]-noise, "Poisson arrivals in order: %v", a)
		}
		require.InDelta(t, a[i], b[i], noise)
	}
	require.Greater(t, a[9], 0.02)
	require.Less(t, a[9], 2.0)

	// Bounded by duration: arrivals stop at the deadline.
	r := &Runner{Client: c, Opts: Options{MaxTokens: 2, RequestRate: 100, Duration: 300 * time.Millisecond}}
	sc, err := r.Run(t.Context(), Load)
	require.NoError(t, err)
	require.NotEmpty(t, sc.Requests)
	require.Less(t, len(sc.Requests), 100)
	for _, req := range sc.Requests {
		require.Less(t, req.StartTime, 0.5, "sent after the 0.3 s deadline (0.2 s allowed for a loaded machine)")
	}
	require.Equal(t, 0.3, sc.Config.DurationLimit)
	require.Zero(t, sc.Config.NumPrompts)

	_, err = (&Runner{Client: c, Opts: Options{RequestRate: math.Inf(1), Duration: time.Second}}).Run(t.Context(), Load)
	require.ErrorIs(t, err, ErrUnboundedLoad)
}

func TestLoadCancelled(t *testing.T) {
	c, _ := client(t, &fake{delay: 50 * time.Millisecond})
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	r := &Runner{Client: c, Opts: Options{MaxTokens: 8, Concurrency: 2, NumPrompts: 1000}}
	sc, err := r.Run(ctx, Load)
	require.NoError(t, err)
	require.False(t, sc.OK)
	require.Less(t, len(sc.Requests), 1000)
	require.Positive(t, sc.Summary.Failed, "the requests in flight are cancelled")
}

func TestReportJSONFields(t *testing.T) {
	c, _ := client(t, &fake{})
	rep, err := (&Runner{Client: c, Opts: Options{MaxTokens: 4, NumPrompts: 3}}).RunAll(t.Context(), []string{Stream, Load})
	require.NoError(t, err)
	rep.Tool, rep.URL, rep.Model = "govllm bench", c.BaseURL, c.Model
	var buf bytes.Buffer
	require.NoError(t, rep.WriteJSON(&buf))
	var doc map[string]any
	require.NoError(t, json.Unmarshal(buf.Bytes(), &doc))
	keys := func(m any) []string {
		var ks []string
		for k := range m.(map[string]any) {
			ks = append(ks, k)
		}
		slices.Sort(ks)
		return ks
	}
	// These names are documented in the README and read by scripts: change them only with it.
	require.Equal(t, []string{"date", "model", "ok", "scenarios", "tool", "url", "version"}, keys(doc))
	sc := doc["scenarios"].([]any)[1].(map[string]any)
	require.Equal(t, []string{"checks", "config", "description", "ok", "requests", "scenario", "summary"}, keys(sc))
	require.Equal(t, []string{"endpoint", "ignore_eos", "max_concurrency", "max_tokens", "num_prompts", "request_rate", "seed"}, keys(sc["config"]))
	var want []string
	for _, m := range []string{"ttft", "tpot", "itl", "e2el"} {
		for _, s := range []string{"mean", "median", "std", "p50", "p90", "p99"} {
			want = append(want, s+"_"+m+"_ms")
		}
	}
	want = append(want, "duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
		"output_throughput", "total_token_throughput", "max_output_tokens_per_s", "max_concurrent_requests",
		"mean_tokens_per_s", "total_chunks", "total_content_chunks", "finish_reasons", "errors")
	slices.Sort(want)
	require.Equal(t, want, keys(sc["summary"]))
	req := sc["requests"].([]any)[0]
	require.Equal(t, []string{"chunks", "content_chunks", "done", "e2el", "finish_reason", "generated_text", "http_status",
		"index", "itl", "output_tokens", "output_tokens_from", "prompt_tokens", "start_time", "stream", "success",
		"tokens_per_s", "tpot", "ttft"}, keys(req))
}

func TestReportText(t *testing.T) {
	c, _ := client(t, &fake{})
	rep, err := (&Runner{Client: c, Opts: Options{MaxTokens: 4, NumPrompts: 25, Concurrency: 2}}).RunAll(t.Context(), []string{Compare, Load})
	require.NoError(t, err)
	rep.URL, rep.Model, rep.Server = c.BaseURL, "fake-model", "local"
	var buf bytes.Buffer
	require.NoError(t, rep.WriteText(&buf, false))
	out := buf.String()
	for _, want := range []string{
		"govllm bench: local (" + c.BaseURL + "), model fake-model",
		"=== compare: the same greedy prompt streamed and not, side by side [PASS]",
		"non-stream", "Successful requests:", "Output token throughput (tok/s):", "TTFT (ms)", "p99",
		"(5 more successful requests; --verbose lists them)", "ok   same text", "finish reasons: length×25",
		"PASS: 2 scenarios",
	} {
		require.Contains(t, out, want)
	}
	buf.Reset()
	require.NoError(t, rep.WriteText(&buf, true))
	require.NotContains(t, buf.String(), "more successful requests")

	rep.Scenarios[0].OK = false
	buf.Reset()
	require.NoError(t, rep.WriteText(&buf, false))
	require.Contains(t, buf.String(), "FAIL: 1 of 2 scenarios failed: compare")
}

func TestBar(t *testing.T) {
	var buf bytes.Buffer
	b := NewBar(&buf)
	b.Start("load", 4, 0)
	for range 4 {
		b.Done(Result{Success: true})
	}
	b.Done(Result{})
	b.Finish()
	out := buf.String()
	require.Contains(t, out, "load")
	require.Contains(t, out, "4/4 failed 0")
	require.Contains(t, out, "██████")
	require.True(t, strings.HasSuffix(out, "\r\033[K"))
}
