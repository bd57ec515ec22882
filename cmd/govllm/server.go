package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/govllm/govllm/registry"
	"github.com/govllm/govllm/supervise"
)

const serverUsage = `Usage: govllm server COMMAND [flags]

Commands:
  add NAME [--model DIR] [--engine auto|vllm|transformers] [--tensor-parallel N] [--port N]
           [--host H] [--python PATH] [--gpus LIST] [--replace] [-- MORE SERVE FLAGS]
  add NAME --endpoint-url URL      a remote OpenAI-compatible server (bench only)
  list [--json]                    the servers and whether they run
  show NAME [--json]               one server: its settings, command, pid file and log
  rm NAME                          forget a server (stop it first)
  start NAME [--detach] [--port N] [--wait 10m] [-- MORE SERVE FLAGS]
                                   run govllm serve with the server's settings; --detach runs it
                                   in the background (pid file and log in the state directory)
  stop NAME [--timeout 60s]        SIGTERM (the server drains), SIGKILL after the timeout

The registry is $XDG_CONFIG_HOME/govllm/servers.json (default ~/.config); pid files and logs
are in $XDG_STATE_HOME/govllm/NAME/ (default ~/.local/state).
`

// serverCmd is `govllm server`.
func serverCmd(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, serverUsage)
		return 2
	}
	switch args[0] {
	case "add":
		return serverAdd(args[1:], stdout, stderr)
	case "list", "ls":
		return serverList(args[1:], stdout, stderr)
	case "show":
		return serverShow(args[1:], stdout, stderr)
	case "rm", "remove":
		return serverRemove(args[1:], stdout, stderr)
	case "start":
		return serverStart(args[1:], stdout, stderr)
	case "stop":
		return serverStop(args[1:], stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, serverUsage)
		return 0
	default:
		fmt.Fprintf(stderr, "govllm server: unknown command %q\n\n%s", args[0], serverUsage)
		return 2
	}
}

// parseInterleaved parses flags that may come before or after the positional arguments;
// arguments after "--" are returned apart, unparsed.
func parseInterleaved(fs *flag.FlagSet, args []string) (positional, rest []string, err error) {
	for i, a := range args {
		if a == "--" {
			args, rest = args[:i], args[i+1:]
			break
		}
	}
	for {
		if err := fs.Parse(args); err != nil {
			return nil, nil, err
		}
		if fs.NArg() == 0 {
			return positional, rest, nil
		}
		positional = append(positional, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

// oneName parses a command that takes exactly one server name.
func oneName(fs *flag.FlagSet, args []string, stderr io.Writer) (string, []string, bool) {
	pos, rest, err := parseInterleaved(fs, args)
	if err != nil {
		return "", nil, false
	}
	if len(pos) != 1 {
		fmt.Fprintf(stderr, "%s: want one server name, got %d arguments\n", fs.Name(), len(pos))
		fs.Usage()
		return "", nil, false
	}
	return pos[0], rest, true
}

func openRegistry() (*registry.Store, error) {
	p, err := registry.DefaultPath()
	if err != nil {
		return nil, err
	}
	return registry.Open(p), nil
}

// lookup opens the registry and returns the entry called name and its state directory.
func lookup(name string) (registry.Entry, supervise.State, error) {
	reg, err := openRegistry()
	if err != nil {
		return registry.Entry{}, supervise.State{}, err
	}
	e, err := reg.Get(name)
	if err != nil {
		return e, supervise.State{}, err
	}
	st, err := supervise.StateOf(name)
	return e, st, err
}

func usageFunc(fs *flag.FlagSet, line string) func() {
	return func() {
		fmt.Fprintf(fs.Output(), "Usage: %s\n\n", line)
		fs.PrintDefaults()
	}
}

func serverAdd(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("govllm server add", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		model    = fs.String("model", "", "Hugging Face checkpoint directory (default: the bootstrap's models/SmolLM2-135M-Instruct)")
		eng      = fs.String("engine", "", "engine: auto (the default), vllm, transformers, or module:attr")
		tp       = fs.Int("tensor-parallel", 0, "GPUs per model replica (vllm; 0: serve's default)")
		host     = fs.String("host", "", "address to listen on (default 127.0.0.1)")
		port     = fs.Int("port", 0, "port to listen on (default: the first from 8000 no other server uses)")
		python   = fs.String("python", "", "Python interpreter to embed (default: serve's discovery)")
		gpus     = fs.String("gpus", "", "GPUs to use, by nvidia-smi index or UUID, comma-separated")
		endpoint = fs.String("endpoint-url", "", "base URL of a remote OpenAI-compatible server, instead of a local one")
		replace  = fs.Bool("replace", false, "overwrite a server of the same name")
	)
	fs.IntVar(tp, "tensor-parallel-size", 0, "alias of --tensor-parallel")
	fs.Usage = usageFunc(fs, "govllm server add NAME [--model DIR] [--engine E] [--tensor-parallel N] [--port N] [--python PATH] [--gpus LIST] [-- SERVE FLAGS]\n"+
		"       govllm server add NAME --endpoint-url URL")
	name, rest, ok := oneName(fs, args, stderr)
	if !ok {
		return 2
	}
	e := registry.Entry{Name: name, Model: *model, Engine: *eng, TensorParallel: *tp, Host: *host, Port: *port,
		Python: *python, GPUs: *gpus, Args: rest, EndpointURL: *endpoint}
	if e.EndpointURL == "" && e.Model == "" {
		e.Model = defaultModel()
	}
	if !e.Remote() {
		// What start will run must pass serve's own checks now, not at start.
		if err := e.Normalize(); err != nil {
			fmt.Fprintf(stderr, "govllm server add: %v\n", err)
			return 1
		}
		if err := checkServeArgs(e.ServeArgs()[1:]); err != nil {
			fmt.Fprintf(stderr, "govllm server add: %v\n", err)
			return 1
		}
	}
	reg, err := openRegistry()
	if err != nil {
		fmt.Fprintf(stderr, "govllm server add: %v\n", err)
		return 1
	}
	e, err = reg.Add(e, *replace)
	if err != nil {
		fmt.Fprintf(stderr, "govllm server add: %v\n", err)
		return 1
	}
	if e.Remote() {
		fmt.Fprintf(stdout, "added remote server %s at %s; measure it with `govllm bench %s`\n", e.Name, e.URL(), e.Name)
		return 0
	}
	if list, err := reg.List(); err == nil {
		for _, o := range list {
			if o.Name != e.Name && !o.Remote() && o.Port == e.Port && o.Host == e.Host {
				fmt.Fprintf(stderr, "govllm server add: note: server %s uses port %d too; the two cannot run at once\n", o.Name, e.Port)
			}
		}
	}
	fmt.Fprintf(stdout, "added server %s: %s, engine %s, on %s; start it with `govllm server start %s --detach`\n",
		e.Name, e.Model, e.Engine, e.URL(), e.Name)
	return 0
}

// serverStatus is one server as list and show report it.
type serverStatus struct {
	registry.Entry
	URL string `json:"url"`
	// Status is "running", "stopped" or "remote".
	Status   string `json:"status"`
	PID      int    `json:"pid,omitempty"`
	StateDir string `json:"state_dir,omitempty"`
	PIDFile  string `json:"pid_file,omitempty"`
	Log      string `json:"log,omitempty"`
	Command  string `json:"command,omitempty"`
}

func statusOf(e registry.Entry) (serverStatus, error) {
	s := serverStatus{Entry: e, URL: e.URL(), Status: "remote"}
	if e.Remote() {
		return s, nil
	}
	st, err := supervise.StateOf(e.Name)
	if err != nil {
		return s, err
	}
	s.Status, s.StateDir, s.PIDFile, s.Log = "stopped", st.Dir, st.PIDFile(), st.LogFile()
	s.Command = "govllm " + supervise.ShellJoin(e.ServeArgs())
	ps, err := st.Probe()
	if err != nil {
		return s, err
	}
	if ps.Running {
		s.Status, s.PID = "running", ps.PID
		if ps.URL != "" {
			s.URL = ps.URL
		}
	}
	return s, nil
}

func serverList(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("govllm server list", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	fail := func(err error) int {
		fmt.Fprintf(stderr, "govllm server list: %v\n", err)
		return 1
	}
	reg, err := openRegistry()
	if err != nil {
		return fail(err)
	}
	list, err := reg.List()
	if err != nil {
		return fail(err)
	}
	statuses := make([]serverStatus, 0, len(list)) // [] in JSON when empty, not null
	for _, e := range list {
		s, err := statusOf(e)
		if err != nil {
			return fail(err)
		}
		statuses = append(statuses, s)
	}
	return printList(stdout, stderr, statuses, *asJSON, reg.Path())
}

func printList(stdout, stderr io.Writer, statuses []serverStatus, asJSON bool, path string) int {
	if asJSON {
		return writeJSON(stdout, stderr, statuses)
	}
	if len(statuses) == 0 {
		fmt.Fprintf(stdout, "no servers in %s: add one with `govllm server add NAME --model DIR`\n", path)
		return 0
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSTATUS\tURL\tENGINE\tTP\tMODEL")
	for _, s := range statuses {
		status := s.Status
		if s.PID > 0 {
			status += fmt.Sprintf(" (pid %d)", s.PID)
		}
		eng, tp, model := s.Engine, "-", s.Model
		if s.Remote() {
			eng, model = "-", "-"
		}
		if s.TensorParallel > 0 {
			tp = strconv.Itoa(s.TensorParallel)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", s.Name, status, s.URL, eng, tp, model)
	}
	_ = tw.Flush()
	return 0
}

func writeJSON(stdout, stderr io.Writer, v any) int {
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		fmt.Fprintf(stderr, "govllm: %v\n", err)
		return 1
	}
	return 0
}

func serverShow(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("govllm server show", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print JSON")
	fs.Usage = usageFunc(fs, "govllm server show NAME [--json]")
	name, _, ok := oneName(fs, args, stderr)
	if !ok {
		return 2
	}
	e, _, err := lookup(name)
	if err != nil {
		fmt.Fprintf(stderr, "govllm server show: %v\n", err)
		return 1
	}
	s, err := statusOf(e)
	if err != nil {
		fmt.Fprintf(stderr, "govllm server show: %v\n", err)
		return 1
	}
	if *asJSON {
		return writeJSON(stdout, stderr, s)
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	row := func(k, v string) {
		if v != "" {
			fmt.Fprintf(tw, "%s:\t%s\n", k, v)
		}
	}
	row("name", s.Name)
	status := s.Status
	if s.PID > 0 {
		status += fmt.Sprintf(" (pid %d)", s.PID)
	}
	row("status", status)
	row("url", s.URL)
	if !e.Remote() {
		row("model", e.Model)
		row("engine", e.Engine)
		if e.TensorParallel > 0 {
			row("tensor parallel", strconv.Itoa(e.TensorParallel))
		}
		row("python", e.Python)
		row("gpus", e.GPUs)
		row("command", s.Command)
		row("pid file", s.PIDFile)
		row("log", s.Log)
	}
	row("added", e.Added.Format(time.RFC3339))
	_ = tw.Flush()
	return 0
}

func serverRemove(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("govllm server rm", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = usageFunc(fs, "govllm server rm NAME")
	name, _, ok := oneName(fs, args, stderr)
	if !ok {
		return 2
	}
	e, st, err := lookup(name)
	if err != nil {
		fmt.Fprintf(stderr, "govllm server rm: %v\n", err)
		return 1
	}
	if !e.Remote() {
		if ps, err := st.Probe(); err == nil && ps.Running {
			fmt.Fprintf(stderr, "govllm server rm: server %s is running (pid %d): `govllm server stop %s` first\n", name, ps.PID, name)
			return 1
		}
	}
	reg, err := openRegistry()
	if err == nil {
		err = reg.Remove(name)
	}
	if err != nil {
		fmt.Fprintf(stderr, "govllm server rm: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "removed server %s\n", name)
	return 0
}
