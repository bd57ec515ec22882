package bench

import (
	"context"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"
)

// The scenarios of govllm bench.
const (
	Basic       = "basic"
	Stream      = "stream"
	Compare     = "compare"
	MultiTurn   = "multi-turn"
	Temperature = "temperature"
	Long        = "long"
	RapidFire   = "rapid-fire"
	System      = "system"
	Load        = "load"
)

// Scenarios lists every scenario with what it does, in the order `all` runs them.
var Scenarios = []struct{ Name, Description string }{
	{Basic, "non-streaming requests: text, finish_reason and usage"},
	{Stream, "streaming requests: TTFT, ITL, TPOT, chunks, [DONE]"},
	{Compare, "the same greedy prompt streamed and not, side by side"},
	{MultiTurn, "a conversation of three turns, each sent with the earlier answers"},
	{Temperature, "temperature 0.0 (twice), 0.5 and 1.0 on one prompt"},
	{Long, "one long output (--long-max-tokens)"},
	{RapidFire, "N streaming requests back to back"},
	{System, "system prompts: the answer is checked against them (reported, not required)"},
	{Load, "a load test: --concurrency N (closed loop) or --request-rate R (Poisson), for --num-prompts or --duration"},
}

// Suite is the scenarios that `suite` (the default) names: all but load.
var Suite = []string{Basic, Stream, Compare, MultiTurn, Temperature, Long, RapidFire, System}

// ParseScenarios reads a comma-separated list of scenario names; "suite" stands for Suite and
// "all" for every scenario.
func ParseScenarios(s string) ([]string, error) {
	var out []string
	add := func(names ...string) {
		for _, n := range names {
			if !slices.Contains(out, n) {
				out = append(out, n)
			}
		}
	}
	for _, name := range strings.Split(s, ",") {
		name = strings.TrimSpace(name)
		switch {
		case name == "":
		case name == "suite":
			add(Suite...)
		case name == "all":
			add(Suite...)
			add(Load)
		case slices.ContainsFunc(Scenarios, func(sc struct{ Name, Description string }) bool { return sc.Name == name }):
			add(name)
		default:
			return nil, fmt.Errorf("unknown scenario %q: use %s, suite or all", name, strings.Join(scenarioNames(), ", "))
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no scenario: use %s, suite or all", strings.Join(scenarioNames(), ", "))
	}
	return out, nil
}

func scenarioNames() []string {
	names := make([]string, len(Scenarios))
	for i, s := range Scenarios {
		names[i] = s.Name
	}
	return names
}

// Options tune the scenarios. Zero values take the defaults documented on each field.
type Options struct {
	// MaxTokens is the max_tokens of each request (default 128).
	MaxTokens int
	// LongMaxTokens is the long scenario's max_tokens (default 1024).
	LongMaxTokens int
	// Requests is how many requests basic and stream (default 3) and rapid-fire (default 10)
	// send.
	Requests int
	// Temperature, when set, is sent with the requests of basic, stream, rapid-fire, long and
	// load (otherwise the server's default applies).
	Temperature *float64
	// Seed seeds the requests of compare and temperature and the load scenario's arrivals.
	Seed int64
	// IgnoreEOS sends ignore_eos: true with long and load requests, for fixed output lengths.
	IgnoreEOS bool
	// Completions sends basic, stream, rapid-fire, long and load requests to /v1/completions
	// with a plain prompt instead of /v1/chat/completions.
	Completions bool
	// Prompt replaces the built-in prompts of basic, stream, rapid-fire, long and load.
	Prompt string

	// Concurrency is how many load requests may be in flight; with no RequestRate it is a
	// closed loop (a new request as soon as one ends). Default 8 when RequestRate is 0.
	Concurrency int
	// RequestRate is the load scenario's mean arrival rate in requests per second, with
	// Poisson (exponential) gaps drawn from Seed; +Inf sends them all at once.
	RequestRate float64
	// NumPrompts bounds the load scenario's requests (default 64 without Duration).
	NumPrompts int
	// Duration bounds the time in which load requests are sent (those in flight finish).
	Duration time.Duration

	// Progress, when set, is told about every request.
	Progress Progress
}

// Progress follows a run: Start at each scenario (total 0 when unknown), Done after each
// request, Finish at the scenario's end.
type Progress interface {
	Start(scenario string, total int, limit time.Duration)
	Done(r Result)
	Finish()
}

// Config is what a scenario ran with, as recorded in its result.
type Config struct {
	Endpoint    string   `json:"endpoint"`
	MaxTokens   int      `json:"max_tokens"`
	Temperature *float64 `json:"temperature,omitempty"`
	Seed        int64    `json:"seed"`
	IgnoreEOS   bool     `json:"ignore_eos"`
	// RequestRate is a number or "inf", as vLLM writes it (load only).
	RequestRate any `json:"request_rate,omitempty"`
	// MaxConcurrency is the cap on requests in flight (load only; 0: none).
	MaxConcurrency int `json:"max_concurrency,omitempty"`
	// NumPrompts and DurationLimit are the load scenario's bounds (0: none).
	NumPrompts    int     `json:"num_prompts,omitempty"`
	DurationLimit float64 `json:"duration_limit,omitempty"`
}

// Check is one verdict of a scenario. An advisory check is reported but does not fail the
// scenario (a small model may not follow a system prompt).
type Check struct {
	Name     string `json:"name"`
	OK       bool   `json:"ok"`
	Advisory bool   `json:"advisory,omitempty"`
	Detail   string `json:"detail,omitempty"`
}

// ScenarioResult is one scenario's outcome: its requests, their summary and its checks. OK
// is false when a non-advisory check failed.
type ScenarioResult struct {
	Scenario    string   `json:"scenario"`
	Description string   `json:"description"`
	OK          bool     `json:"ok"`
	Config      Config   `json:"config"`
	Summary     Summary  `json:"summary"`
	Checks      []Check  `json:"checks"`
	Requests    []Result `json:"requests"`
}

// Runner runs scenarios with one client.
type Runner struct {
	Client *Client
	Opts   Options
}

// Run runs one scenario. Request failures are in the result, never an error; Run returns an
// error only for an unknown scenario or bad options.
func (r *Runner) Run(ctx context.Context, name string) (ScenarioResult, error) {
	o := r.opts()
	res := ScenarioResult{Scenario: name, Checks: []Check{}, Requests: []Result{}}
	for _, s := range Scenarios {
		if s.Name == name {
			res.Description = s.Description
		}
	}
	if res.Description == "" {
		return res, fmt.Errorf("bench: unknown scenario %q", name)
	}
	res.Config = Config{Endpoint: r.endpoint(), MaxTokens: o.MaxTokens, Temperature: o.Temperature, Seed: o.Seed}
	s := &run{r: r, o: o, ctx: ctx, res: &res}
	var err error
	switch name {
	case Basic:
		s.basic()
	case Stream:
		s.stream()
	case Compare:
		s.compare()
	case MultiTurn:
		s.multiTurn()
	case Temperature:
		s.temperature()
	case Long:
		s.long()
	case RapidFire:
		s.rapidFire()
	case System:
		s.system()
	case Load:
		err = s.load()
	}
	if err != nil {
		return res, err
	}
	res.Summary = Summarize(res.Requests, s.elapsed)
	res.OK = true
	for _, c := range res.Checks {
		if !c.OK && !c.Advisory {
			res.OK = false
		}
	}
	return res, nil
}

// opts returns the options with defaults filled in.
func (r *Runner) opts() Options {
	o := r.Opts
	if o.MaxTokens <= 0 {
		o.MaxTokens = 128
	}
	if o.LongMaxTokens <= 0 {
		o.LongMaxTokens = 1024
	}
	return o
}

func (r *Runner) endpoint() string {
	if r.Opts.Completions {
		return "/v1/completions"
	}
	return "/v1/chat/completions"
}

// run is one scenario's state.
type run struct {
	r       *Runner
	o       Options
	ctx     context.Context
	res     *ScenarioResult
	start   time.Time
	elapsed float64
}

// Prompts are the built-in prompts, used in turn.
var Prompts = []string{
	"What is the capital of France?",
	"Explain in two sentences why the sky is blue.",
	"Write a haiku about autumn leaves.",
	"List three uses of a paperclip.",
	"What is 17 multiplied by 23? Show your reasoning.",
	"Describe a cat to someone who has never seen one.",
	"Give me a recipe for a simple tomato soup.",
	"Tell me a short story about a dragon who learns to read.",
	"What are the main differences between a lake and a sea?",
	"Summarize the plot of Romeo and Juliet in three sentences.",
	"How do airplanes stay in the air?",
	"Suggest five names for a bakery.",
}

// prompt is the i-th prompt: --prompt, else the built-in ones in turn.
func (s *run) prompt(i int) string {
	if s.o.Prompt != "" {
		return s.o.Prompt
	}
	return Prompts[i%len(Prompts)]
}

// request is the i-th plain request of basic, stream, rapid-fire and load.
func (s *run) request(i int, stream bool, maxTokens int) Request {
	req := Request{Stream: stream, MaxTokens: maxTokens, Temperature: s.o.Temperature}
	if s.r.Opts.Completions {
		req.Prompt = s.prompt(i)
	} else {
		req.Messages = []Message{{Role: "user", Content: s.prompt(i)}}
	}
	return req
}

func (s *run) begin(total int) {
	s.start = time.Now()
	s.r.Client.Epoch = s.start
	if s.o.Progress != nil {
		s.o.Progress.Start(s.res.Scenario, total, s.o.Duration)
	}
}

func (s *run) end() {
	s.elapsed = time.Since(s.start).Seconds()
	if s.o.Progress != nil {
		s.o.Progress.Finish()
	}
}

// do sends one request and records it.
func (s *run) do(req Request) Result {
	res := s.r.Client.Do(s.ctx, req)
	res.Index = len(s.res.Requests)
	s.res.Requests = append(s.res.Requests, res)
	if s.o.Progress != nil {
		s.o.Progress.Done(res)
	}
	return res
}

func (s *run) check(name string, ok bool, format string, args ...any) {
	s.res.Checks = append(s.res.Checks, Check{Name: name, OK: ok, Detail: fmt.Sprintf(format, args...)})
}

func (s *run) advise(name string, ok bool, format string, args ...any) {
	s.res.Checks = append(s.res.Checks, Check{Name: name, OK: ok, Advisory: true, Detail: fmt.Sprintf(format, args...)})
}

// checkSucceeded adds the check that every request succeeded, naming the first failure.
func (s *run) checkSucceeded() {
	failed := 0
	first := ""
	for _, r := range s.res.Requests {
		if !r.Success {
			if failed == 0 {
				first = fmt.Sprintf(": request %d: %s", r.Index, r.Error)
			}
			failed++
		}
	}
	s.check("requests succeeded", failed == 0, "%d of %d succeeded%s", len(s.res.Requests)-failed, len(s.res.Requests), first)
}

// checkConsistent adds the check that each successful request's numbers agree with each
// other: TTFT ≤ E2EL, one ITL per content chunk after the first, tokens/s = tokens ÷ E2EL.
func (s *run) checkConsistent() {
	for _, r := range s.res.Requests {
		if !r.Success {
			continue
		}
		var bad string
		switch {
		case r.TTFT > r.E2EL:
			bad = fmt.Sprintf("TTFT %.3fs > E2EL %.3fs", r.TTFT, r.E2EL)
		case r.Stream && len(r.ITL) != r.ContentChunks-1:
			bad = fmt.Sprintf("%d ITL gaps for %d content chunks", len(r.ITL), r.ContentChunks)
		case r.E2EL > 0 && math.Abs(r.TokensPerS-float64(r.OutputTokens)/r.E2EL) > 1e-9:
			bad = "tokens/s is not output tokens ÷ E2EL"
		case r.Stream && r.ContentChunks > r.Chunks:
			bad = "more content chunks than chunks"
		}
		if bad != "" {
			s.check("metrics consistent", false, "request %d: %s", r.Index, bad)
			return
		}
	}
	s.check("metrics consistent", true, "TTFT ≤ E2EL, one ITL gap per content chunk after the first, tokens/s = tokens ÷ E2EL")
}

// checkUsage reports whether the server reported token usage (advisory: without it output
// tokens are counted as content chunks).
func (s *run) checkUsage() {
	without := 0
	for _, r := range s.res.Requests {
		if r.Success && r.OutputTokensFrom != "usage" {
			without++
		}
	}
	s.advise("usage reported", without == 0, "%d successful requests without usage", without)
}

func (s *run) basic() {
	n := s.o.Requests
	if n <= 0 {
		n = 3
	}
	s.begin(n)
	for i := range n {
		s.do(s.request(i, false, s.o.MaxTokens))
	}
	s.end()
	s.checkSucceeded()
	empty := 0
	for _, r := range s.res.Requests {
		if r.Success && (r.Text == "" || r.FinishReason == "") {
			empty++
		}
	}
	s.check("text and finish_reason", empty == 0, "%d answers without text or finish_reason", empty)
	s.checkUsage()
}

func (s *run) stream() {
	s.streamSequence(3)
	s.checkUsage()
}

func (s *run) rapidFire() { s.streamSequence(10) }

// streamSequence sends --requests (default n) streaming requests one after another and checks
// that they succeeded with consistent numbers.
func (s *run) streamSequence(n int) {
	if s.o.Requests > 0 {
		n = s.o.Requests
	}
	s.begin(n)
	for i := range n {
		s.do(s.request(i, true, s.o.MaxTokens))
	}
	s.end()
	s.checkSucceeded()
	s.checkConsistent()
}

func (s *run) long() {
	req := s.request(7, true, s.o.LongMaxTokens) // the dragon story
	if s.o.Prompt == "" {
		req.Messages = []Message{{Role: "user", Content: "Write a long, detailed story about a dragon who learns to read, with many chapters."}}
		if s.r.Opts.Completions {
			req.Messages, req.Prompt = nil, "Once upon a time, in a kingdom far away, there lived a dragon who"
		}
	}
	req.IgnoreEOS = s.o.IgnoreEOS
	s.res.Config.MaxTokens, s.res.Config.IgnoreEOS = s.o.LongMaxTokens, s.o.IgnoreEOS
	s.begin(1)
	r := s.do(req)
	s.end()
	s.checkSucceeded()
	s.checkConsistent()
	if r.Success {
		s.advise("ran to max_tokens", r.FinishReason == "length", "%d tokens of %d, finish_reason %q, %.1f tokens/s",
			r.OutputTokens, s.o.LongMaxTokens, r.FinishReason, r.TokensPerS)
	}
}

// ptr returns a pointer to v.
func ptr[T any](v T) *T { return &v }

func (s *run) compare() {
	msgs := []Message{{Role: "user", Content: "What is the capital of France?"}}
	seed := s.o.Seed
	s.res.Config.Temperature, s.res.Config.Endpoint = ptr(0.0), "/v1/chat/completions"
	s.begin(2)
	st := s.do(Request{Label: "stream", Messages: msgs, Stream: true, MaxTokens: s.o.MaxTokens, Temperature: ptr(0.0), Seed: &seed})
	ns := s.do(Request{Label: "non-stream", Messages: msgs, MaxTokens: s.o.MaxTokens, Temperature: ptr(0.0), Seed: &seed})
	s.end()
	s.checkSucceeded()
	s.checkConsistent()
	if st.Success && ns.Success {
		s.advise("same text", st.Text == ns.Text, "greedy: streamed %q, unstreamed %q", clip(st.Text, 80), clip(ns.Text, 80))
		s.advise("same output tokens", st.OutputTokens == ns.OutputTokens,
			"streamed %d tokens in %.0f ms (TTFT %.0f ms), unstreamed %d tokens in %.0f ms",
			st.OutputTokens, st.E2EL*1000, st.TTFT*1000, ns.OutputTokens, ns.E2EL*1000)
	}
}

func (s *run) multiTurn() {
	questions := []string{
		"My name is Alice and my favourite colour is green. Please remember that.",
		"What is my name?",
		"And what is my favourite colour?",
	}
	s.res.Config.Endpoint = "/v1/chat/completions"
	s.begin(len(questions))
	var msgs []Message
	for i, q := range questions {
		msgs = append(msgs, Message{Role: "user", Content: q})
		r := s.do(Request{Label: fmt.Sprintf("turn %d", i+1), Messages: slices.Clone(msgs), Stream: true,
			MaxTokens: s.o.MaxTokens, Temperature: ptr(0.0), Seed: &s.o.Seed})
		if !r.Success {
			break
		}
		msgs = append(msgs, Message{Role: "assistant", Content: r.Text})
	}
	s.end()
	s.checkSucceeded()
	s.checkConsistent()
	reqs := s.res.Requests
	if len(reqs) == len(questions) && reqs[len(reqs)-1].Success {
		grew, usage := true, true
		counts := make([]string, len(reqs))
		for i, r := range reqs {
			counts[i] = fmt.Sprint(r.PromptTokens)
			if r.OutputTokensFrom != "usage" {
				usage = false
			}
			if i > 0 && r.PromptTokens <= reqs[i-1].PromptTokens+reqs[i-1].OutputTokens/2 {
				grew = false
			}
		}
		if usage {
			s.check("context kept", grew, "prompt tokens per turn: %s (each turn carries the earlier ones)", strings.Join(counts, ", "))
		} else {
			s.advise("context kept", false, "the server reported no usage: prompt tokens unknown")
		}
		a2 := strings.ToLower(reqs[1].Text)
		s.advise("context used", strings.Contains(a2, "alice"), "turn 2 answer: %q", clip(reqs[1].Text, 80))
	}
}

func (s *run) temperature() {
	temps := []float64{0, 0, 0.5, 1}
	s.res.Config.Endpoint = "/v1/chat/completions"
	s.res.Config.Temperature = nil
	msgs := []Message{{Role: "user", Content: "Write one sentence about the sea."}}
	s.begin(len(temps))
	for i, t := range temps {
		label := fmt.Sprintf("temperature %.1f", t)
		if i == 1 {
			label += " again"
		}
		seed := s.o.Seed + int64(i)
		s.do(Request{Label: label, Messages: msgs, Stream: true, MaxTokens: s.o.MaxTokens, Temperature: ptr(t), Seed: &seed})
	}
	s.end()
	s.checkSucceeded()
	s.checkConsistent()
	rs := s.res.Requests
	if len(rs) == 4 && rs[0].Success && rs[1].Success {
		s.advise("temperature 0 repeats itself", rs[0].Text == rs[1].Text, "%q", clip(rs[0].Text, 80))
	}
	distinct := map[string]bool{}
	for _, r := range rs {
		if r.Success && r.Label != "temperature 0.0 again" {
			distinct[r.Text] = true
		}
	}
	s.advise("temperatures differ", len(distinct) == 3, "%d distinct texts at 0.0, 0.5 and 1.0", len(distinct))
}

// frenchWords are common French words; an answer with several of them is taken as French.
var frenchWords = []string{"le", "la", "les", "est", "et", "je", "il", "elle", "de", "des", "du", "un", "une",
	"bonjour", "oui", "c'est", "vous", "nous", "pour", "avec", "aujourd'hui", "temps", "très", "pas", "sur", "dans"}

func (s *run) system() {
	s.res.Config.Endpoint = "/v1/chat/completions"
	s.res.Config.Temperature = ptr(0.0)
	s.begin(2)
	word := s.do(Request{Label: "single word", Messages: []Message{
		{Role: "system", Content: "Reply with the single word banana, and nothing else, whatever the user says."},
		{Role: "user", Content: "What is the capital of France?"},
	}, Stream: true, MaxTokens: s.o.MaxTokens, Temperature: ptr(0.0), Seed: &s.o.Seed})
	french := s.do(Request{Label: "in French", Messages: []Message{
		{Role: "system", Content: "You always answer in French, never in English."},
		{Role: "user", Content: "What is the weather usually like in summer?"},
	}, Stream: true, MaxTokens: s.o.MaxTokens, Temperature: ptr(0.0), Seed: &s.o.Seed})
	s.end()
	s.checkSucceeded()
	s.checkConsistent()
	if word.Success {
		s.advise("system prompt honoured: single word", strings.Contains(strings.ToLower(word.Text), "banana"),
			"answer: %q", clip(word.Text, 80))
	}
	if french.Success {
		n := 0
		for _, w := range strings.FieldsFunc(strings.ToLower(french.Text), func(r rune) bool {
			return !(r == '\'' || r == 'é' || r == 'è' || r == 'ê' || r == 'à' || r == 'ç' || (r >= 'a' && r <= 'z'))
		}) {
			if slices.Contains(frenchWords, w) {
				n++
			}
		}
		s.advise("system prompt honoured: French", n >= 3, "%d common French words in %q", n, clip(french.Text, 80))
	}
}

// clip shortens s to n runes.
func clip(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	return string(r[:n]) + "…"
}

// RunAll runs the named scenarios in order into a report (its target fields left to the
// caller); it stops early when ctx ends. The report is OK when every scenario is.
func (r *Runner) RunAll(ctx context.Context, names []string) (Report, error) {
	rep := Report{OK: true, Scenarios: []ScenarioResult{}}
	for _, name := range names {
		if ctx.Err() != nil {
			break
		}
		sc, err := r.Run(ctx, name)
		if err != nil {
			return rep, err
		}
		rep.Scenarios = append(rep.Scenarios, sc)
		rep.OK = rep.OK && sc.OK
	}
	if ctx.Err() != nil {
		rep.OK = false
	}
	return rep, nil
}
