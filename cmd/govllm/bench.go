package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/govllm/govllm/bench"
)

// defaultBenchURL is the server bench measures when given neither a name nor --url: the one
// `make run` starts.
const defaultBenchURL = "http://127.0.0.1:8000"

// benchCmd is `govllm bench`: the scenarios against a registered server or a URL. It exits 0
// when every scenario passed, 1 when one failed or the server cannot be reached, 2 on bad
// usage.
func benchCmd(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("govllm bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		url         = fs.String("url", "", "base URL of an OpenAI-compatible server (default "+defaultBenchURL+", or the named server's)")
		scenarios   = fs.String("scenario", "suite", "comma-separated scenarios: "+strings.Join(scenarioList(), ", ")+"; suite (all but load) or all")
		model       = fs.String("model", "", "model name to request (default: the first id of GET /v1/models)")
		apiKey      = fs.String("api-key", firstEnv("GOVLLM_API_KEY", "OPENAI_API_KEY"), "Bearer key (default: $GOVLLM_API_KEY, else $OPENAI_API_KEY)")
		maxTokens   = fs.Int("max-tokens", 128, "max_tokens of each request")
		longTokens  = fs.Int("long-max-tokens", 1024, "max_tokens of the long scenario")
		requests    = fs.Int("requests", 0, "requests of basic and stream (default 3) and rapid-fire (default 10)")
		temperature = fs.String("temperature", "", "temperature of basic, stream, rapid-fire, long and load requests (default: the server's)")
		seed        = fs.Int64("seed", 0, "seed of the requests of compare, multi-turn, system and temperature, and of load's arrivals")
		ignoreEOS   = fs.Bool("ignore-eos", false, "send ignore_eos: true with long and load requests, so outputs run to max_tokens (vLLM, govllm)")
		endpoint    = fs.String("endpoint", "chat", "chat (/v1/chat/completions) or completions (/v1/completions) for basic, stream, rapid-fire, long and load")
		prompt      = fs.String("prompt", "", "prompt of basic, stream, rapid-fire, long and load (default: built-in prompts in turn)")
		concurrency = fs.Int("concurrency", 0, fmt.Sprintf("load: requests in flight at most; alone, a closed loop (default %d without --request-rate)", bench.DefaultConcurrency))
		rate        = fs.String("request-rate", "", "load: mean requests per second, Poisson arrivals seeded by --seed; inf sends all at once")
		numPrompts  = fs.Int("num-prompts", 0, fmt.Sprintf("load: requests to send (default %d without --duration)", bench.DefaultNumPrompts))
		duration    = fs.Duration("duration", 0, "load: send requests for this long (those in flight then finish)")
		timeout     = fs.Duration("timeout", 10*time.Minute, "limit of each request")
		asJSON      = fs.Bool("json", false, "print one JSON document on stdout instead of the tables")
		verbose     = fs.Bool("verbose", false, "list every request, not the first 20 and the failures")
		noProgress  = fs.Bool("no-progress", false, "no progress bar (there is none anyway when stderr is not a terminal)")
		allowNoDone = fs.Bool("allow-no-done", false, "accept streams that end after their finish_reason without data: [DONE] (transformers serve)")
	)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: govllm bench [NAME | --url URL] [--scenario LIST] [flags]\n\n"+
			"Tests and measures an OpenAI-compatible server: a registered server NAME (govllm server list),\n"+
			"or --url. Scenarios:\n")
		for _, s := range bench.Scenarios {
			fmt.Fprintf(fs.Output(), "  %-12s %s\n", s.Name, s.Description)
		}
		fmt.Fprintln(fs.Output())
		fs.PrintDefaults()
	}
	pos, _, err := parseInterleaved(fs, args)
	if err != nil {
		return 2
	}
	usageErr := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "govllm bench: "+format+"\n", a...)
		return 2
	}
	if len(pos) > 1 {
		return usageErr("want at most one server name, got %q", pos)
	}
	names, err := bench.ParseScenarios(*scenarios)
	if err != nil {
		return usageErr("--scenario: %v", err)
	}
	opts := bench.Options{
		MaxTokens: *maxTokens, LongMaxTokens: *longTokens, Requests: *requests, Seed: *seed, IgnoreEOS: *ignoreEOS,
		Prompt: *prompt, Concurrency: *concurrency, NumPrompts: *numPrompts, Duration: *duration,
	}
	if *temperature != "" {
		t, err := strconv.ParseFloat(*temperature, 64)
		if err != nil || t < 0 {
			return usageErr("--temperature %q: want a number ≥ 0", *temperature)
		}
		opts.Temperature = &t
	}
	switch *endpoint {
	case "chat":
	case "completions":
		opts.Completions = true
	default:
		return usageErr("--endpoint %q: use chat or completions", *endpoint)
	}
	if *rate != "" {
		r, err := strconv.ParseFloat(*rate, 64)
		if err != nil || r <= 0 || math.IsNaN(r) {
			return usageErr("--request-rate %q: want requests per second > 0, or inf", *rate)
		}
		opts.RequestRate = r
	}
	if *concurrency < 0 || *numPrompts < 0 || *duration < 0 || *maxTokens <= 0 || *longTokens <= 0 || *requests < 0 {
		return usageErr("--concurrency, --num-prompts, --duration, --requests must be ≥ 0 and --max-tokens, --long-max-tokens > 0")
	}
	if *duration > 0 && *concurrency == 0 && math.IsInf(opts.RequestRate, 1) {
		return usageErr("%v", bench.ErrUnboundedLoad)
	}

	rep := bench.Report{Tool: "govllm bench", Version: version}
	target := *url
	if len(pos) == 1 {
		if *url != "" {
			return usageErr("give a server name or --url, not both")
		}
		rep.Server = pos[0]
		if target, err = registeredURL(pos[0]); err != nil {
			fmt.Fprintf(stderr, "govllm bench: %v\n", err)
			return 1
		}
	}
	if target == "" {
		target = defaultBenchURL
	}
	rep.URL = strings.TrimSuffix(strings.TrimSuffix(target, "/"), "/v1")

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	client := &bench.Client{BaseURL: rep.URL, APIKey: *apiKey, Model: *model, Timeout: *timeout, AllowMissingDone: *allowNoDone,
		HTTP: bench.NewHTTPClient(max(*concurrency, 64))}
	defer client.Close()
	if client.Model == "" {
		mctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		ids, err := client.Models(mctx)
		cancel()
		if err == nil && len(ids) == 0 {
			err = errors.New("GET /v1/models lists no model")
		}
		if err != nil {
			hint := "is the server running? pass --model NAME if it has no /v1/models"
			if rep.Server != "" {
				hint = fmt.Sprintf("is it running? `govllm server start %s --detach`", rep.Server)
			}
			fmt.Fprintf(stderr, "govllm bench: %v (%s)\n", err, hint)
			return 1
		}
		client.Model = ids[0]
	}
	rep.Model = client.Model
	rep.Date = time.Now().UTC().Format(time.RFC3339)
	if !*noProgress && isTerminal(stderr) {
		opts.Progress = bench.NewBar(stderr)
	}
	runner := &bench.Runner{Client: client, Opts: opts}
	res, err := runner.RunAll(ctx, names)
	if err != nil {
		fmt.Fprintf(stderr, "govllm bench: %v\n", err)
		return 2
	}
	rep.OK, rep.Scenarios = res.OK, res.Scenarios
	if *asJSON {
		err = rep.WriteJSON(stdout)
	} else {
		err = rep.WriteText(stdout, *verbose)
	}
	if err != nil {
		fmt.Fprintf(stderr, "govllm bench: %v\n", err)
		return 1
	}
	if ctx.Err() != nil {
		fmt.Fprintln(stderr, "govllm bench: interrupted")
		return 1
	}
	if !rep.OK {
		return 1
	}
	return 0
}

// registeredURL is the URL of the registered server called name: where it runs when govllm
// started it, else its entry's.
func registeredURL(name string) (string, error) {
	e, st, err := lookup(name)
	if err != nil {
		return "", err
	}
	if !e.Remote() {
		if ps, err := st.Probe(); err == nil && ps.Running && ps.URL != "" {
			return ps.URL, nil
		}
	}
	return e.URL(), nil
}

func scenarioList() []string {
	var names []string
	for _, s := range bench.Scenarios {
		names = append(names, s.Name)
	}
	return names
}

func firstEnv(keys ...string) string {
	for _, k := range keys {
		if v := os.Getenv(k); v != "" {
			return v
		}
	}
	return ""
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
