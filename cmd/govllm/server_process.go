package main

// The subcommands of `govllm server` that run processes, start and stop: flags and output
// over package supervise.

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/govllm/govllm/supervise"
)

// serverStart is `govllm server start`: the checks whose messages name the fix (remote, model
// gone, running already, stale pid file, port in use), then supervise's Run or Start.
func serverStart(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("govllm server start", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		detach = fs.Bool("detach", false, "run in the background: pid file and log in the state directory; return once /health answers 200")
		port   = fs.Int("port", 0, "listen on this port this time (default: the server's)")
		wait   = fs.Duration("wait", supervise.DefaultWait, "with --detach: how long to wait for /health before giving up")
	)
	fs.Usage = usageFunc(fs, "govllm server start NAME [--detach] [--port N] [--wait 10m] [-- MORE SERVE FLAGS]")
	name, extra, ok := oneName(fs, args, stderr)
	if !ok {
		return 2
	}
	fail := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "govllm server start: "+format+"\n", a...)
		return 1
	}
	sup := &supervise.Supervisor{Logger: slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))}
	reg, err := openRegistry()
	if err != nil {
		return fail("%v", err)
	}
	e, err := reg.Get(name)
	if err != nil {
		return fail("%v", err)
	}
	if e.Remote() {
		return fail("server %s is remote (%s): govllm cannot start it; start it where it runs. `govllm bench %s` measures it", name, e.EndpointURL, name)
	}
	if err := e.Normalize(); err != nil { // the model may have gone since add
		return fail("server %s: %v", name, err)
	}
	st, err := sup.State(name)
	if err != nil {
		return fail("%v", err)
	}
	ps, err := st.Probe()
	if err != nil {
		return fail("%v", err)
	}
	if ps.Running {
		return fail("server %s is already running (pid %d, %s): `govllm server stop %s` first", name, ps.PID, ps.URL, name)
	}
	if ps.Stale {
		fmt.Fprintf(stderr, "govllm server start: removed the stale pid file of %s (pid %d is gone)\n", name, ps.PID)
	}
	if *port > 0 {
		e.Port = *port
	}
	others, err := reg.List()
	if err != nil {
		return fail("%v", err)
	}
	if err := sup.CheckPort(e, others); err != nil {
		return fail("%v", err)
	}
	opts := supervise.StartOptions{Args: extra, Wait: *wait}
	if !*detach {
		opts.Stdout, opts.Stderr = stdout, stderr
		code, err := sup.Run(context.Background(), e, opts)
		if err != nil {
			return fail("%v", err)
		}
		return code
	}
	opts.Started = func(inst supervise.Instance) {
		fmt.Fprintf(stderr, "govllm server start: %s starting (pid %d), waiting up to %s for %s/health; log: %s\n",
			name, inst.PID, *wait, inst.URL, inst.Log)
	}
	inst, err := sup.Start(context.Background(), e, opts)
	if err != nil {
		return fail("%v", err)
	}
	fmt.Fprintf(stdout, "server %s is ready at %s (pid %d); log: %s; stop it with `govllm server stop %s`\n",
		name, inst.URL, inst.PID, inst.Log, name)
	return 0
}

// serverStop is `govllm server stop`: SIGTERM, SIGKILL after --timeout, the pid file removed.
func serverStop(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("govllm server stop", flag.ContinueOnError)
	fs.SetOutput(stderr)
	grace := fs.Duration("timeout", 60*time.Second, "how long the server may drain after SIGTERM before SIGKILL")
	fs.Usage = usageFunc(fs, "govllm server stop NAME [--timeout 60s]")
	name, _, ok := oneName(fs, args, stderr)
	if !ok {
		return 2
	}
	e, st, err := lookup(name)
	if err != nil {
		fmt.Fprintf(stderr, "govllm server stop: %v\n", err)
		return 1
	}
	if e.Remote() {
		fmt.Fprintf(stderr, "govllm server stop: server %s is remote (%s): govllm does not run it\n", name, e.EndpointURL)
		return 1
	}
	ps, err := st.Probe()
	if err != nil {
		fmt.Fprintf(stderr, "govllm server stop: %v\n", err)
		return 1
	}
	if !ps.Running {
		if ps.Stale {
			fmt.Fprintf(stdout, "server %s is not running (removed its stale pid file: pid %d is gone)\n", name, ps.PID)
		} else {
			fmt.Fprintf(stdout, "server %s is not running\n", name)
		}
		return 0
	}
	killed, err := supervise.Stop(ps.PID, *grace)
	if err != nil {
		fmt.Fprintf(stderr, "govllm server stop: %v\n", err)
		return 1
	}
	if err := st.Clear(); err != nil {
		fmt.Fprintf(stderr, "govllm server stop: %v\n", err)
	}
	if killed {
		fmt.Fprintf(stdout, "server %s (pid %d) did not exit within %s of SIGTERM: killed\n", name, ps.PID, *grace)
		return 0
	}
	fmt.Fprintf(stdout, "stopped server %s (pid %d)\n", name, ps.PID)
	return 0
}
