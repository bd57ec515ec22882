// Package registry keeps govllm's named servers: entries for local servers (model, engine,
// port, interpreter, GPUs) that `govllm server start` runs, and for remote OpenAI-compatible
// endpoints that `govllm bench` can measure. Entries live in one JSON file in the XDG config
// directory ($XDG_CONFIG_HOME/govllm/servers.json, default ~/.config), rewritten atomically
// (a temporary file renamed over it) under an exclusive flock on a lock file beside it, so
// concurrent edits by several processes lose no entry. The registry only stores entries:
// starting, probing and stopping their processes is package supervise's.
package registry

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/govllm/govllm/internal/atomicfile"
	"github.com/govllm/govllm/internal/pyfind"
	"github.com/govllm/govllm/internal/xdg"
)

// DefaultHost and DefaultPort are where a local server listens unless told otherwise; an
// entry added without a port gets the first port from DefaultPort that no other entry on its
// host uses.
const (
	DefaultHost = "127.0.0.1"
	DefaultPort = 8000
)

// Sentinel errors.
var (
	// ErrNotFound means no entry has the name.
	ErrNotFound = errors.New("registry: no such server")
	// ErrExists means an entry with the name exists already.
	ErrExists = errors.New("registry: server exists")
	// ErrInvalid marks an entry that fails validation; the message names the fix.
	ErrInvalid = errors.New("registry: invalid server entry")
)

// Entry is one named server: local (Model, Engine, …; `govllm server start` runs
// `govllm serve` with them) or remote (EndpointURL only).
type Entry struct {
	// Name identifies the server in the registry and names its state directory.
	Name string `json:"name"`
	// Model is the checkpoint directory (an absolute path).
	Model string `json:"model,omitempty"`
	// Engine is govllm serve's --engine.
	Engine string `json:"engine,omitempty"`
	// TensorParallel is --tensor-parallel-size (0: not passed).
	TensorParallel int `json:"tensor_parallel,omitempty"`
	// Host is the address the server listens on (--host).
	Host string `json:"host,omitempty"`
	// Port is the port it listens on (--port).
	Port int `json:"port,omitempty"`
	// Python is the interpreter to embed (--python; empty: serve's discovery).
	Python string `json:"python,omitempty"`
	// GPUs are the devices to use (--gpus: nvidia-smi indexes or UUIDs, comma-separated).
	GPUs string `json:"gpus,omitempty"`
	// Args are more `govllm serve` flags, passed after the others.
	Args []string `json:"args,omitempty"`
	// EndpointURL is a remote server's base URL (http://host:port, without /v1).
	EndpointURL string `json:"endpoint_url,omitempty"`
	// Added is when the entry was added (UTC, to the second).
	Added time.Time `json:"added"`
}

// Remote reports whether the entry is a remote endpoint, which govllm does not start.
func (e Entry) Remote() bool { return e.EndpointURL != "" }

// URL is the base URL clients use: the endpoint URL, or http://host:port of a local server
// (a wildcard host reached through 127.0.0.1).
func (e Entry) URL() string {
	if e.Remote() {
		return e.EndpointURL
	}
	host := e.Host
	switch host {
	case "", "0.0.0.0", "::", "[::]":
		host = "127.0.0.1"
	}
	return "http://" + joinHostPort(host, e.Port)
}

func joinHostPort(host string, port int) string {
	if strings.Contains(host, ":") && !strings.HasPrefix(host, "[") {
		host = "[" + host + "]"
	}
	return host + ":" + strconv.Itoa(port)
}

// ServeArgs are the arguments of `govllm` that serve the entry (starting with "serve").
func (e Entry) ServeArgs() []string {
	args := []string{"serve", "--host", e.Host, "--port", strconv.Itoa(e.Port), "--model", e.Model, "--engine", e.Engine}
	if e.TensorParallel > 0 {
		args = append(args, "--tensor-parallel-size", strconv.Itoa(e.TensorParallel))
	}
	if e.Python != "" {
		args = append(args, "--python", e.Python)
	}
	if e.GPUs != "" {
		args = append(args, "--gpus", e.GPUs)
	}
	return append(args, e.Args...)
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// Normalize checks the entry and rewrites it in place: it fills in the defaults (engine
// auto, host 127.0.0.1), makes the model and interpreter paths absolute and the endpoint URL
// canonical. Its errors wrap ErrInvalid and name the fix. It checks the file system (the
// model directory, the interpreter) but not ports.
func (e *Entry) Normalize() error {
	if !nameRE.MatchString(e.Name) {
		return invalid("server name %q: use letters, digits, '.', '_' and '-' (up to 64, starting with a letter or digit)", e.Name)
	}
	if e.Remote() {
		return e.normalizeRemote()
	}
	if e.Engine == "" {
		e.Engine = "auto"
	}
	if err := pyfind.CheckEngine(e.Engine); err != nil {
		return invalid("%v", err)
	}
	if e.Model == "" {
		return invalid("no model: pass --model DIR, a Hugging Face checkpoint directory")
	}
	abs, err := filepath.Abs(e.Model)
	if err != nil {
		return invalid("model %s: %v", e.Model, err)
	}
	e.Model = abs
	st, err := os.Stat(abs)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return invalid("model directory %s does not exist: pass --model DIR (a Hugging Face checkpoint directory), "+
			"or run scripts/bootstrap (make bootstrap) to create the default model", abs)
	case err != nil:
		return invalid("model %s: %v", abs, err)
	case !st.IsDir():
		return invalid("model %s is not a directory: pass --model DIR, a Hugging Face checkpoint directory", abs)
	}
	if _, err := os.Stat(filepath.Join(abs, "config.json")); err != nil {
		return invalid("model directory %s has no config.json, so it is not a Hugging Face checkpoint: pass --model DIR", abs)
	}
	if e.TensorParallel < 0 {
		return invalid("--tensor-parallel %d: use 1 or more", e.TensorParallel)
	}
	if e.Host == "" {
		e.Host = DefaultHost
	}
	if e.Port < 0 || e.Port > 65535 {
		return invalid("--port %d: use 1 to 65535", e.Port)
	}
	if e.Python != "" {
		p, err := filepath.Abs(e.Python)
		if err != nil {
			return invalid("--python %s: %v", e.Python, err)
		}
		if _, err := os.Stat(p); err != nil {
			return invalid("--python %s: no such file: point it at the interpreter of a venv that has the engine's packages", p)
		}
		e.Python = p
	}
	return nil
}

func (e *Entry) normalizeRemote() error {
	var local []string
	for _, f := range []struct {
		flag string
		set  bool
	}{{"--model", e.Model != ""}, {"--engine", e.Engine != ""}, {"--tensor-parallel", e.TensorParallel != 0},
		{"--port", e.Port != 0}, {"--host", e.Host != ""}, {"--python", e.Python != ""}, {"--gpus", e.GPUs != ""},
		{"serve flags", len(e.Args) > 0}} {
		if f.set {
			local = append(local, f.flag)
		}
	}
	if len(local) > 0 {
		return invalid("--endpoint-url names a remote server, which govllm does not start: drop %s", strings.Join(local, ", "))
	}
	u, err := url.Parse(strings.TrimSpace(e.EndpointURL))
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return invalid("--endpoint-url %q: want http://HOST[:PORT] or https://… (the server's base URL)", e.EndpointURL)
	}
	u.Path = strings.TrimSuffix(strings.TrimSuffix(u.Path, "/"), "/v1")
	u.RawQuery, u.Fragment = "", ""
	e.EndpointURL = strings.TrimSuffix(u.String(), "/")
	return nil
}

// file is the registry file's format.
type file struct {
	Version int     `json:"version"`
	Servers []Entry `json:"servers"`
}

// DefaultPath is the registry file: $XDG_CONFIG_HOME/govllm/servers.json, with
// XDG_CONFIG_HOME defaulting to ~/.config (a relative value is ignored, as the XDG spec says).
func DefaultPath() (string, error) {
	dir, err := xdg.ConfigHome()
	if err != nil {
		return "", fmt.Errorf("registry: %w", err)
	}
	return filepath.Join(dir, "govllm", "servers.json"), nil
}

// Store is the registry file at one path.
type Store struct {
	path string
}

// Open returns the store at path (DefaultPath for the user's); the file need not exist.
func Open(path string) *Store { return &Store{path: path} }

// Path is the registry file's path.
func (s *Store) Path() string { return s.path }

// List returns the entries, sorted by name.
func (s *Store) List() ([]Entry, error) {
	f, err := s.read()
	if err != nil {
		return nil, err
	}
	return f.Servers, nil
}

// Get returns the entry called name; its error wraps ErrNotFound when there is none.
func (s *Store) Get(name string) (Entry, error) {
	f, err := s.read()
	if err != nil {
		return Entry{}, err
	}
	for _, e := range f.Servers {
		if e.Name == name {
			return e, nil
		}
	}
	return Entry{}, notFound(name)
}

func notFound(name string) error {
	return fmt.Errorf("%w %q: add it with `govllm server add %s --model DIR` (or --endpoint-url URL); `govllm server list` shows the others",
		ErrNotFound, name, name)
}

// Add normalizes e and stores it, replacing an entry of the same name only when replace is
// set (else the error wraps ErrExists). A local entry without a port gets the first free one
// from DefaultPort among the entries on its host. It returns the entry as stored.
func (s *Store) Add(e Entry, replace bool) (Entry, error) {
	if err := e.Normalize(); err != nil {
		return e, err
	}
	if e.Added.IsZero() {
		e.Added = time.Now().UTC().Truncate(time.Second)
	}
	err := s.Update(func(entries []Entry) ([]Entry, error) {
		i := slices.IndexFunc(entries, func(o Entry) bool { return o.Name == e.Name })
		if i >= 0 && !replace {
			return nil, fmt.Errorf("%w: %q is already registered (%s): pass --replace to overwrite it, or `govllm server rm %s`",
				ErrExists, e.Name, describe(entries[i]), e.Name)
		}
		if i >= 0 {
			entries = slices.Delete(entries, i, i+1)
		}
		if !e.Remote() && e.Port == 0 {
			e.Port = freePort(entries, e.Host)
		}
		return append(entries, e), nil
	})
	return e, err
}

// freePort is the first port from DefaultPort that no entry on host uses.
func freePort(entries []Entry, host string) int {
	for p := DefaultPort; ; p++ {
		if !slices.ContainsFunc(entries, func(o Entry) bool { return !o.Remote() && o.Port == p && o.Host == host }) {
			return p
		}
	}
}

// describe is a short description of an entry.
func describe(e Entry) string {
	if e.Remote() {
		return "remote " + e.EndpointURL
	}
	return fmt.Sprintf("%s on %s, engine %s", e.Model, e.URL(), e.Engine)
}

// Remove deletes the entry called name; its error wraps ErrNotFound when there is none.
func (s *Store) Remove(name string) error {
	return s.Update(func(entries []Entry) ([]Entry, error) {
		i := slices.IndexFunc(entries, func(o Entry) bool { return o.Name == name })
		if i < 0 {
			return nil, notFound(name)
		}
		return slices.Delete(entries, i, i+1), nil
	})
}

// lockFile takes an exclusive flock on path, creating it, and returns the unlock.
func lockFile(path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("registry: lock: %w", err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("registry: lock %s: %w", path, err)
	}
	return func() {
		_ = unix.Flock(int(f.Fd()), unix.LOCK_UN)
		f.Close()
	}, nil
}

// Update runs fn on the entries under the registry's lock and writes what it returns
// atomically; an error from fn leaves the file as it was.
func (s *Store) Update(fn func([]Entry) ([]Entry, error)) error {
	if err := os.MkdirAll(filepath.Dir(s.path), 0o755); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	unlock, err := lockFile(s.path + ".lock")
	if err != nil {
		return err
	}
	defer unlock()
	f, err := s.read()
	if err != nil {
		return err
	}
	entries, err := fn(f.Servers)
	if err != nil {
		return err
	}
	slices.SortFunc(entries, func(a, b Entry) int { return strings.Compare(a.Name, b.Name) })
	return s.write(file{Version: 1, Servers: entries})
}

// read reads the file; a missing file is an empty registry.
func (s *Store) read() (file, error) {
	b, err := os.ReadFile(s.path)
	if errors.Is(err, os.ErrNotExist) {
		return file{Version: 1, Servers: []Entry{}}, nil
	}
	if err != nil {
		return file{}, fmt.Errorf("registry: %w", err)
	}
	var f file
	if err := json.Unmarshal(b, &f); err != nil {
		return file{}, fmt.Errorf("registry: %s is not a server registry (%v): fix or remove it", s.path, err)
	}
	if f.Servers == nil {
		f.Servers = []Entry{}
	}
	return f, nil
}

// write replaces the file atomically: a temporary file in the same directory, synced, then
// renamed over it, and the directory synced.
func (s *Store) write(f file) error {
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return fmt.Errorf("registry: encode: %w", err)
	}
	return writeAtomic(s.path, append(b, '\n'), 0o644)
}

// writeAtomic writes data to path through a temporary file renamed over it.
func writeAtomic(path string, data []byte, perm os.FileMode) error {
	if err := atomicfile.WriteFile(path, data, perm); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	return nil
}
