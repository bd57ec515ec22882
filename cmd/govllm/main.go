// Command govllm serves an LLM over an OpenAI-compatible HTTP API, with the inference engine
// (vLLM or Hugging Face transformers) running inside this process.
//
//	govllm serve [--model DIR] [--engine auto|transformers|vllm] [--python PATH] [--host H] [--port N]
//	govllm server add|list|show|rm|start|stop …
//	govllm bench [NAME | --url URL] [--scenario LIST] [--json]
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/govllm/govllm/engine"
	"github.com/govllm/govllm/internal/pyfind"
	"github.com/govllm/govllm/launch"
	"github.com/govllm/govllm/server"
)

const usage = `govllm serves LLMs with the engine in the same process.

Usage:
  govllm serve [flags]    serve the OpenAI-compatible API (govllm serve -h for flags)
  govllm gpus [flags]     list NVIDIA GPUs and the placement serve would pick (govllm gpus -h)
  govllm server COMMAND   named servers: add, list, show, rm, start, stop (govllm server help)
  govllm bench [NAME]     test and measure a server: TTFT, ITL, TPOT, throughput (govllm bench -h)
  govllm version          print the version
`

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "serve":
		return serve(args[1:], stderr)
	case "gpus":
		return gpus(args[1:], stdout, stderr)
	case "server":
		return serverCmd(args[1:], stdout, stderr)
	case "bench":
		return benchCmd(args[1:], stdout, stderr)
	case "version", "--version":
		fmt.Fprintln(stdout, "govllm", version)
		return 0
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "govllm: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
}

// defaultModel is the bootstrap's model directory, found above the binary or the working dir.
func defaultModel() string {
	const rel = "models/SmolLM2-135M-Instruct"
	for _, d := range pyfind.SearchDirs() {
		p := filepath.Join(d, rel)
		if st, err := os.Stat(p); err == nil && st.IsDir() {
			return p
		}
	}
	return rel
}

// serveFlags are govllm serve's flags; server add parses an entry's serve command with them.
type serveFlags struct {
	launch                           *launchFlags
	pythonPath, host, served, apiKey *string
	logLevel                         *string
	port, maxNumSeqs, seed           *int
	maxRunning, maxQueued            *int
	maxBody                          *int64
	drain, reqTimeout, writeTO       *time.Duration
	exitOnDeath                      *bool
}

func newServeFlags(stderr io.Writer) (*flag.FlagSet, *serveFlags) {
	fs := flag.NewFlagSet("govllm serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs, &serveFlags{
		launch:      addLaunchFlags(fs),
		pythonPath:  fs.String("python-path", "", "extra directories for sys.path, separated by ':' (custom backends)"),
		host:        fs.String("host", "127.0.0.1", "address to listen on"),
		port:        fs.Int("port", 8000, "port to listen on"),
		served:      fs.String("served-model-name", "", "model name clients use (default: the model directory's name)"),
		maxNumSeqs:  fs.Int("max-num-seqs", 0, "requests decoded together (default: the engine's)"),
		seed:        fs.Int("seed", 0, "engine seed"),
		apiKey:      fs.String("api-key", os.Getenv("GOVLLM_API_KEY"), "require this Bearer key on /v1/ routes (default: $GOVLLM_API_KEY)"),
		maxBody:     fs.Int64("max-body-bytes", server.DefaultMaxBodyBytes, "request body limit"),
		drain:       fs.Duration("drain-timeout", 30*time.Second, "on SIGTERM, how long in-flight requests may take to finish before they are aborted"),
		maxRunning:  fs.Int("max-concurrent-requests", 512, "completions run at once; more wait in the queue (0: no limit)"),
		maxQueued:   fs.Int("max-queued-requests", 1024, "completions that may wait for a slot; beyond, 429 with Retry-After"),
		reqTimeout:  fs.Duration("request-timeout", 0, "abort a completion this long after it arrived, answering what it generated with finish_reason abort (0: none)"),
		writeTO:     fs.Duration("write-timeout", server.DefaultWriteTimeout, "drop a client, aborting its request, when one write to it blocks this long (a reader that stopped reading)"),
		exitOnDeath: fs.Bool("exit-on-engine-death", false, "exit non-zero when the engine dies (for a supervisor to restart); otherwise keep answering 503"),
		logLevel:    fs.String("log-level", "info", "debug, info, warn or error"),
	}
}

// checkServeArgs checks a serve command line (without "serve") as serve would before it loads
// anything: its flags, then the launch options they make.
func checkServeArgs(args []string) error {
	fs, f := newServeFlags(io.Discard)
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("serve flags: %w", err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("serve flags: unexpected argument %q", fs.Arg(0))
	}
	opts := f.launch.options(false)
	opts.ServedModelName = *f.served
	return launch.Check(opts)
}

func serve(args []string, stderr io.Writer) int {
	fs, f := newServeFlags(stderr)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "govllm serve: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*f.logLevel)); err != nil {
		fmt.Fprintf(stderr, "govllm serve: bad --log-level %q: use debug, info, warn or error\n", *f.logLevel)
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: lvl}))
	if path := os.Getenv("GOVLLM_CPUPROFILE"); path != "" {
		stopProfile, err := startCPUProfile(path)
		if err != nil {
			fmt.Fprintf(stderr, "govllm serve: GOVLLM_CPUPROFILE: %v\n", err)
			return 2
		}
		defer stopProfile()
	}
	opts := f.launch.options(true)
	opts.ServedModelName = *f.served
	if err := launch.Check(opts); err != nil {
		fmt.Fprintf(stderr, "govllm serve: %v\n", err)
		return 2
	}

	// Listen before loading the model so that a busy port fails in a second, not a minute.
	addr := net.JoinHostPort(*f.host, strconv.Itoa(*f.port))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintf(stderr, "govllm serve: cannot listen on %s: %v (is another server running? pick another --port)\n", addr, err)
		return 1
	}
	defer ln.Close()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// A second signal while the engine loads ends the process at once, as it does later.
	go func() {
		<-ctx.Done()
		stop()
	}()
	var extraPath []string
	if *f.pythonPath != "" {
		extraPath = filepath.SplitList(*f.pythonPath)
	}
	// The plan places the model on GPUs before any weight is loaded (on CPU: one line).
	gpuSet, plan, err := setupLaunch(ctx, log, opts)
	if err != nil {
		fmt.Fprintf(stderr, "govllm serve: %v\n", err)
		return 1
	}
	defer gpuSet.Close()
	e, err := engine.Open(ctx, engine.Config{
		Model: opts.Model, Engine: plan.Engine, Python: plan.Python.Executable, PythonPath: extraPath,
		ServedModelName: *f.served, MaxModelLen: opts.MaxModelLen, MaxNumSeqs: *f.maxNumSeqs,
		Dtype: plan.Dtype, Device: plan.Device, Seed: *f.seed, Extra: plan.EngineArgs, Logger: log,
	})
	if err != nil {
		fmt.Fprintf(stderr, "govllm serve: %v\n", err)
		return 1
	}
	defer e.Close()

	gpuSet.startMonitor(ctx)
	handler := server.New(server.Config{
		Backend: e, Logger: log, MaxBodyBytes: *f.maxBody, APIKey: *f.apiKey, Stats: e.Stats,
		Collectors: gpuSet.collectors(), HealthChecks: gpuSet.healthChecks(),
		MaxConcurrent: *f.maxRunning, MaxQueue: *f.maxQueued, RequestTimeout: *f.reqTimeout, WriteTimeout: *f.writeTO,
		Version: version,
	})
	srv := &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	log.Info("govllm: serving", "addr", "http://"+ln.Addr().String(), "model", e.Model().ID, "engine", e.Model().Backend)

	engineDone := e.Done()
	for waiting := true; waiting; {
		select {
		case err := <-serveErr:
			log.Error("govllm: server stopped", "err", err)
			return 1
		case <-engineDone:
			if *f.exitOnDeath {
				log.Error("govllm: engine died, exiting (--exit-on-engine-death)", "err", e.Health())
				return 3
			}
			log.Error("govllm: engine died; answering 503 until restarted", "err", e.Health())
			engineDone = nil
		case <-ctx.Done():
			waiting = false
		}
	}
	stop() // a second signal ends the process at once
	shutdown(srv, handler, *f.drain, log)
	return 0
}

// abortWait is how long aborted requests get to send their last bytes at shutdown.
const abortWait = 5 * time.Second

// shutdown stops accepting connections and lets the requests in flight finish for up to drain;
// it then aborts the rest (their answers end with finish_reason "abort") and waits for them to
// go out, closing what is left after abortWait.
func shutdown(srv *http.Server, h *server.Server, drain time.Duration, log *slog.Logger) {
	log.Info("govllm: shutting down: draining requests", "drain_timeout", drain.String())
	ctx, cancel := context.WithTimeout(context.Background(), drain)
	err := srv.Shutdown(ctx)
	cancel()
	if err == nil {
		log.Info("govllm: drained")
		return
	}
	log.Warn("govllm: drain timeout passed: aborting the requests in flight", "err", err)
	h.AbortRequests()
	ctx, cancel = context.WithTimeout(context.Background(), abortWait)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		log.Warn("govllm: aborted requests did not end in time: closing their connections", "err", err)
		_ = srv.Close()
	}
}
