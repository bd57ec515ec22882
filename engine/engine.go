// Package engine runs an LLM engine (vLLM or Hugging Face transformers) inside the Go process.
//
// A thin C shim embeds CPython; one goroutine, locked to its OS thread, owns the interpreter's
// main thread and runs the Python bridge's asyncio loop; one poller goroutine drains event
// batches from the shim (without the GIL) and hands each request's deltas to its [Stream].
// Requests go to Python through a command queue, so Go never waits for the GIL.
//
// A process hosts one interpreter and runs at most one Engine at a time on it; after Close,
// another Engine (same interpreter) may be opened.
package engine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/govllm/govllm/detok"
	"github.com/govllm/govllm/internal/pyfind"
	"github.com/govllm/govllm/llm"
	"github.com/govllm/govllm/tokenize"
)

// Config says which model to serve, with which engine, in which interpreter. Opening an engine
// changes the process's environment: the backends set HF_HUB_OFFLINE, VLLM_* and
// OMP_NUM_THREADS defaults, and vLLM's multiprocessing executable. Fields are taken as given;
// launch.Resolve makes the plan (auto engine, dtype on CPU, GPU placement) that govllm serve
// passes here.
type Config struct {
	// Model is a Hugging Face checkpoint directory.
	Model string
	// Engine is "transformers", "vllm", "auto" (vllm when importable, else transformers) or a
	// custom backend as "module:attr" (a module on PythonPath with a create(config) function).
	Engine string
	// Python is the interpreter to embed; empty means FindPython's search order.
	Python string
	// PythonPath lists extra directories put first on sys.path (custom backends, tests).
	PythonPath []string
	// ServedModelName is the name clients use; empty means the model directory's base name.
	ServedModelName string
	// MaxModelLen caps the context; 0 means the model's own.
	MaxModelLen int
	// MaxNumSeqs caps the requests decoded together; 0 means the backend's default.
	MaxNumSeqs int
	// Dtype is "auto", "float32", "bfloat16" or "float16".
	Dtype string
	// Seed seeds the engine's global random state.
	Seed int
	// Device is "cpu", "cuda" or "" (cuda when available).
	Device string
	// Extra passes backend-specific options through to Python as JSON.
	Extra map[string]any
	// MaxPendingTokens bounds the output a stream may hold unread (tokens, plus one per
	// delta) before the request is aborted with ErrSlowConsumer; 0 means 1<<20. Unread deltas
	// of a choice are merged, so a reader that falls behind gets fewer, larger deltas.
	MaxPendingTokens int
	// QueueBytes sizes the shim's Python-to-Go event buffers (two of half this size); 0 means
	// 8 MiB, and more than 4 GiB is capped there (records carry 32-bit lengths).
	QueueBytes int64
	// PollCoalesce is how long the poller, woken by a first event, lets a burst gather before
	// taking it: fewer wakeups per token for a little latency. 0 means 100µs; negative, none.
	PollCoalesce time.Duration
	// Logger receives the engine's and the bridge's logs; nil means slog.Default().
	Logger *slog.Logger
}

// Engine is a running in-process engine. Its methods are safe for concurrent use.
type Engine struct {
	cfg    Config
	log    *slog.Logger
	api    *shimAPI
	python *PythonInfo
	info   atomic.Pointer[ModelInfo]       // set by the poller on READY
	tok    atomic.Pointer[detok.Tokenizer] // set on READY when Go detokenizes

	mu        sync.Mutex
	streams   map[int64]*Stream
	statsWait map[int64]chan Stats
	embedWait sync.Map // request id -> chan embedReply of a waiting Embed (embed.go)
	closed    bool
	dead      error // set once when the engine dies

	// tokenizing holds the cmdTokenize round trips waiting for the bridge (tokenize.go).
	tokenizing tokenizeWaits

	// Poller-only state for the batch being handled.
	lastID  int64
	last    *Stream
	touched []*Stream

	ready      chan error    // the bridge's READY (nil) or startup failure
	runDone    chan struct{} // the interpreter's main thread returned
	runErr     error         // what shim_run reported (valid after runDone)
	pollerDone chan struct{}
	stopped    chan struct{} // closed when the engine died or was closed
	stopOnce   sync.Once
	closeOnce  sync.Once
}

// Open starts the interpreter, loads the model and returns when the engine can serve, or when
// ctx ends (the engine is then shut down). Startup failures name the interpreter and the fix.
func Open(ctx context.Context, cfg Config) (*Engine, error) {
	if cfg.Model == "" {
		return nil, errors.New("engine: Config.Model is empty: pass a model directory")
	}
	if abs, err := filepath.Abs(cfg.Model); err == nil {
		cfg.Model = abs
	}
	if st, err := os.Stat(cfg.Model); err != nil || !st.IsDir() {
		return nil, fmt.Errorf("engine: model %s is not a directory: run scripts/bootstrap for the default model, or pass --model DIR (a Hugging Face checkpoint)", cfg.Model)
	}
	if cfg.Engine == "" {
		cfg.Engine = "auto"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.MaxPendingTokens <= 0 {
		cfg.MaxPendingTokens = 1 << 20
	}
	if cfg.PollCoalesce == 0 {
		cfg.PollCoalesce = 100 * time.Microsecond
	}
	if cfg.QueueBytes <= 0 {
		cfg.QueueBytes = 8 << 20
	}
	cfg.QueueBytes = min(cfg.QueueBytes, maxQueueBytes)
	if cfg.ServedModelName == "" {
		cfg.ServedModelName = filepath.Base(cfg.Model)
	}

	py, err := findEnginePython(ctx, &cfg)
	if err != nil {
		return nil, err
	}
	shimPath, pyDir, err := unpackRuntime()
	if err != nil {
		return nil, err
	}
	it, err := acquireInterpreter(py, shimPath, cfg.QueueBytes)
	if err != nil {
		return nil, err
	}
	boot, err := bootCode(py, pyDir, &cfg)
	if err != nil {
		releaseInterpreter()
		return nil, err
	}
	e := &Engine{
		cfg:        cfg,
		log:        cfg.Logger,
		api:        it.api,
		python:     py,
		streams:    make(map[int64]*Stream),
		statsWait:  make(map[int64]chan Stats),
		ready:      make(chan error, 1),
		runDone:    make(chan struct{}),
		pollerDone: make(chan struct{}),
		stopped:    make(chan struct{}),
	}
	e.log.Info("engine: starting", "engine", cfg.Engine, "model", cfg.Model, "python", py.Executable, "python_version", py.Version)
	it.api.open()
	done := make(chan error, 1)
	it.jobs <- runJob{boot: boot, done: done}
	go func() {
		e.runErr = <-done
		close(e.runDone)
	}()
	go e.poll()
	select {
	case err := <-e.ready:
		if err != nil {
			e.Close()
			return nil, err
		}
	case <-ctx.Done():
		if err := e.close(startCancelWait); err != nil {
			return nil, fmt.Errorf("engine: start cancelled (%w) while the backend was still loading: %v", ctx.Err(), err)
		}
		return nil, fmt.Errorf("engine: start cancelled: %w", ctx.Err())
	}
	info := e.Model()
	e.log.Info("engine: ready", "backend", info.Backend, "model", info.ID, "max_model_len", info.MaxModelLen)
	return e, nil
}

// findEnginePython resolves the interpreter and, for "auto", the backend it can run, with the
// rule the launch plan uses (pyfind.ChooseBackend).
func findEnginePython(ctx context.Context, cfg *Config) (*PythonInfo, error) {
	if err := pyfind.CheckEngine(cfg.Engine); err != nil {
		return nil, fmt.Errorf("engine: %w", err)
	}
	py, err := pyfind.Find(ctx, cfg.Python, cfg.Engine)
	if err != nil {
		return nil, err
	}
	if cfg.Engine, err = pyfind.ChooseBackend(cfg.Engine, py); err != nil {
		return nil, err
	}
	return py, nil
}

// bootCode is the Python that the interpreter's main thread runs: it restores the chosen
// interpreter's view of itself (a venv's sys.prefix, sys.path, sys.executable, which matter
// for site-packages and for multiprocessing's spawn) and hands control to the bridge.
func bootCode(py *PythonInfo, pyDir string, cfg *Config) (string, error) {
	path := append([]string{pyDir}, cfg.PythonPath...)
	for _, p := range py.Path {
		if p != "" {
			path = append(path, p)
		}
	}
	bridgeCfg := map[string]any{
		"model":             cfg.Model,
		"engine":            cfg.Engine,
		"served_model_name": cfg.ServedModelName,
		"max_model_len":     cfg.MaxModelLen,
		"max_num_seqs":      cfg.MaxNumSeqs,
		"dtype":             orDefault(cfg.Dtype, "auto"),
		"seed":              cfg.Seed,
		"device":            cfg.Device,
		"extra":             cfg.Extra,
	}
	parts := map[string]any{
		"executable": py.Executable, "prefix": py.Prefix, "exec_prefix": py.ExecPrefix,
		"path": path, "config": bridgeCfg,
	}
	lit := map[string]string{}
	for k, v := range parts {
		b, err := json.Marshal(v)
		if err != nil {
			return "", fmt.Errorf("engine: encode boot config: %w", err)
		}
		lit[k] = string(b)
	}
	// JSON literals are valid Python literals once true/false/null are defined.
	return fmt.Sprintf(`true, false, null = True, False, None
import sys
sys.executable = %s
sys.prefix = %s
sys.exec_prefix = %s
sys.path[:] = %s
sys.argv = [sys.executable]
import govllm.bridge
govllm.bridge.main(%s)
`, lit["executable"], lit["prefix"], lit["exec_prefix"], lit["path"], lit["config"]), nil
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

// poll drains event batches from the shim and routes them; it ends when the shim closes.
func (e *Engine) poll() {
	defer close(e.pollerDone)
	coalesce := coalesceMicros(e.cfg.PollCoalesce)
	var batch unsafe.Pointer // C memory: the shim stores where each batch is
	for {
		n := e.api.poll(200, coalesce, &batch)
		switch {
		case n == 0:
			continue
		case n < 0:
			<-e.runDone
			err := e.runErr
			if err == nil {
				err = errors.New("engine: python bridge stopped")
			}
			e.die(err)
			return
		}
		// The batch is C memory that stays ours until the next poll; handle copies what it keeps.
		buf := unsafe.Slice((*byte)(batch), n)
		err := decodeEvents(buf, e.handle)
		for _, s := range e.touched {
			s.touched = false
			s.wake()
		}
		e.touched = e.touched[:0]
		e.last = nil
		if err != nil {
			e.log.Error("engine: corrupt event batch", "err", err)
			e.die(err)
		}
	}
}

// handle routes one event. It runs on the poller and must never block.
func (e *Engine) handle(ev *event) {
	switch ev.kind {
	case evDelta, evEnd, evError, evPrompt, evParsed, evPromptLogprobs:
		var s *Stream
		if ev.kind == evDelta && ev.reqID == e.lastID && e.last != nil {
			s = e.last // consecutive events of one request skip the table
		} else {
			e.mu.Lock()
			s = e.streams[ev.reqID]
			// A parsing request's END may precede its last parser replies: it stays routed.
			if s != nil && (ev.kind == evError || (ev.kind == evEnd && (s.parse == nil || s.parse.outstanding == 0))) {
				delete(e.streams, ev.reqID)
			}
			e.mu.Unlock()
			e.lastID, e.last = ev.reqID, s
			if ev.kind == evEnd || ev.kind == evError {
				e.last = nil
			}
		}
		if s == nil {
			if ev.kind == evError {
				e.onTokenizeEvent(ev) // a tokenize round trip's error, if one waits
			}
			return // already closed by its reader
		}
		switch ev.kind {
		case evPrompt:
			prompt := int32s(ev.meta)
			s.setPrompt(prompt)
			if tok := e.tok.Load(); tok != nil {
				s.text = newTextState(tok, &s.sampling, prompt)
			}
		case evPromptLogprobs:
			s.addPromptLogprobs(ev.meta, e.tok.Load())
		case evDelta:
			if !s.pushEvent(ev) {
				e.abort(s.id)
			}
			if !s.touched {
				// Readers are woken once per batch, not once per event.
				s.touched = true
				e.touched = append(e.touched, s)
			}
		case evEnd:
			var m struct {
				Usage Usage `json:"usage"`
			}
			_ = json.Unmarshal(ev.meta, &m)
			if s.text != nil {
				// Go counted the output: a stop string it matched dropped the later tokens.
				m.Usage.CompletionTokens = s.text.completionTokens()
			}
			if s.parse != nil && s.parse.outstanding > 0 {
				s.parse.end = &m.Usage // finished by the last reply
				return
			}
			s.finish(m.Usage, nil)
		case evParsed:
			if s.onParsed(ev.meta) {
				e.forget(s.id)
				s.finish(*s.parse.end, nil)
			}
			if !s.touched {
				s.touched = true
				e.touched = append(e.touched, s)
			}
		case evError:
			re := &RequestError{Status: 500, Type: "InternalServerError"}
			if err := json.Unmarshal(ev.meta, re); err != nil || re.Message == "" {
				re.Message = string(ev.meta)
			}
			s.finish(Usage{}, re)
		}
	case evReady:
		var m struct {
			Model       string `json:"model"`
			Root        string `json:"root"`
			MaxModelLen int    `json:"max_model_len"`
			Backend     string `json:"backend"`
			// BackendVersion is the backend library's version (GET /version).
			BackendVersion string `json:"backend_version"`
			// Tokenizer is the directory of the tokenizer.json Go detokenizes with; empty
			// when the backend sends text.
			Tokenizer string `json:"tokenizer"`
			// The parsers the bridge loaded, and whether the backend applies structured outputs.
			ToolCallParser    string `json:"tool_call_parser"`
			ReasoningParser   string `json:"reasoning_parser"`
			StructuredOutputs bool   `json:"structured_outputs"`
			// Adapters are the LoRA adapters the backend loaded.
			Adapters []llm.Adapter `json:"adapters"`
			Runner   string        `json:"runner"` // "pooling" serves embeddings only
		}
		if err := json.Unmarshal(ev.meta, &m); err != nil {
			e.die(fmt.Errorf("engine: bad ready event: %w", err))
			return
		}
		if m.Tokenizer != "" {
			tok, err := detok.Load(m.Tokenizer)
			if err != nil {
				e.die(fmt.Errorf("engine: the Go detokenizer cannot read the model's tokenizer: %w", err))
				return
			}
			e.tok.Store(tok)
			enc, err := tokenize.Load(m.Tokenizer)
			if err != nil {
				// The backend tokenizes in Python (tokenizers this package does not reproduce).
				e.log.Info("engine: prompts are tokenized in Python", "reason", err)
				enc = nil
			}
			e.installEncoder(enc)
		}
		e.info.Store(&ModelInfo{ID: m.Model, Root: m.Root, MaxModelLen: m.MaxModelLen, Backend: m.Backend, BackendVersion: m.BackendVersion,
			ToolCallParser: m.ToolCallParser, ReasoningParser: m.ReasoningParser, StructuredOutputs: m.StructuredOutputs,
			Adapters: m.Adapters, Runner: m.Runner})
		select {
		case e.ready <- nil:
		default:
		}
	case evFatal:
		var m struct {
			Message string `json:"message"`
		}
		_ = json.Unmarshal(ev.meta, &m)
		err := fmt.Errorf("%w: %s", ErrEngineDead, m.Message)
		select {
		case e.ready <- fmt.Errorf("engine: start failed: %s", m.Message):
		default:
		}
		e.die(err)
	case evTokenized:
		e.onTokenizeEvent(ev)
	case evStats:
		e.mu.Lock()
		ch := e.statsWait[ev.reqID]
		delete(e.statsWait, ev.reqID)
		e.mu.Unlock()
		if ch != nil {
			var st Stats
			_ = json.Unmarshal(ev.meta, &st)
			ch <- st
		}
	case evEmbedding:
		e.onEmbedding(ev)
	case evLog:
		var m struct {
			Level   string `json:"level"`
			Message string `json:"message"`
		}
		_ = json.Unmarshal(ev.meta, &m)
		lvl := slog.LevelInfo
		_ = lvl.UnmarshalText([]byte(m.Level))
		e.log.Log(context.Background(), lvl, m.Message, "source", "python")
	}
}

// die marks the engine dead and fails every open stream. Only the first cause is kept.
func (e *Engine) die(err error) {
	e.mu.Lock()
	if e.dead == nil {
		if e.closed {
			e.dead = ErrClosed
		} else {
			e.dead = err
			if !errors.Is(err, ErrEngineDead) {
				e.dead = fmt.Errorf("%w: %v", ErrEngineDead, err)
			}
		}
	}
	streams := e.streams
	e.streams = map[int64]*Stream{}
	dead := e.dead
	e.mu.Unlock()
	e.stopOnce.Do(func() { close(e.stopped) })
	select {
	case e.ready <- fmt.Errorf("engine: start failed: %w", err):
	default:
	}
	for _, s := range streams {
		s.finish(Usage{}, dead)
	}
}

// Generate submits req and returns its stream, a *Stream. ctx covers the whole request:
// cancelling it aborts the request in the backend and ends the stream with ctx's error.
func (e *Engine) Generate(ctx context.Context, req Request) (llm.TokenStream, error) {
	s, err := e.Start(ctx, req)
	if err != nil {
		return nil, err // not a typed nil inside the interface
	}
	return s, nil
}

// Start is Generate returning the concrete *Stream (for its ID and Abort).
func (e *Engine) Start(ctx context.Context, req Request) (*Stream, error) {
	if err := req.Validate(); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	payload, err := json.Marshal(&req)
	if err != nil {
		return nil, fmt.Errorf("engine: encode request: %w", err)
	}
	id := nextRequestID.Add(1)
	s := newStream(e, id, e.cfg.MaxPendingTokens, req.Sampling)
	if p := req.Parsing; p != nil && (p.ToolCalls || p.Reasoning) {
		s.parse = &parseState{streamed: p.Streamed}
	}
	e.mu.Lock()
	switch {
	case e.closed:
		e.mu.Unlock()
		return nil, ErrClosed
	case e.dead != nil:
		err := e.dead
		e.mu.Unlock()
		return nil, err
	}
	e.streams[id] = s
	e.mu.Unlock()
	if rc := e.api.send(cmdSubmit, id, &payload[0], int64(len(payload))); rc != 0 {
		e.forget(id)
		return nil, fmt.Errorf("%w: submit: %s", ErrEngineDead, e.api.lastError())
	}
	s.watch(ctx)
	return s, nil
}

// abort asks the backend to abort a request; its END (or ERROR) event follows.
func (e *Engine) abort(id int64) {
	e.api.send(cmdAbort, id, nil, 0)
}

// stopChoice tells the backend that Go ended choice index of a request (a stop string).
func (e *Engine) stopChoice(id int64, index int) {
	data := []byte(strconv.Itoa(index))
	e.api.send(cmdStopChoice, id, &data[0], int64(len(data)))
}

// forget drops a stream from the routing table.
func (e *Engine) forget(id int64) {
	e.mu.Lock()
	delete(e.streams, id)
	e.mu.Unlock()
}

// Stats asks the backend for its load; it waits for the answer until ctx ends.
func (e *Engine) Stats(ctx context.Context) (Stats, error) {
	if err := e.Health(); err != nil {
		return Stats{}, err
	}
	id := nextRequestID.Add(1)
	ch := make(chan Stats, 1)
	e.mu.Lock()
	e.statsWait[id] = ch
	e.mu.Unlock()
	defer func() {
		e.mu.Lock()
		delete(e.statsWait, id)
		e.mu.Unlock()
	}()
	if rc := e.api.send(cmdStats, id, nil, 0); rc != 0 {
		return Stats{}, fmt.Errorf("%w: stats: %s", ErrEngineDead, e.api.lastError())
	}
	select {
	case st := <-ch:
		return st, nil
	case <-ctx.Done():
		return Stats{}, fmt.Errorf("engine: stats: %w", ctx.Err())
	case <-e.pollerDone:
		return Stats{}, ErrClosed
	}
}

// Model describes the model being served.
func (e *Engine) Model() ModelInfo {
	if m := e.info.Load(); m != nil {
		return *m
	}
	return ModelInfo{}
}

// Python describes the embedded interpreter.
func (e *Engine) Python() PythonInfo { return *e.python }

// Health returns nil while the engine can serve, else an error wrapping ErrEngineDead or ErrClosed.
func (e *Engine) Health() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return ErrClosed
	}
	return e.dead
}

// Running returns the number of requests in flight.
func (e *Engine) Running() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.streams)
}

// Done is closed when the engine stops serving: it died (Health then says why) or was closed.
func (e *Engine) Done() <-chan struct{} { return e.stopped }

// Close aborts every request, shuts the backend down and waits (up to a minute) for the
// interpreter's loop to end. The interpreter itself stays loaded until the process exits. It
// returns an error when the loop did not end in time: the interpreter then stays busy, and no
// other Engine can open in this process.
func (e *Engine) Close() error { return e.close(time.Minute) }

// startCancelWait bounds how long Open, cancelled, waits for the backend to give up its start.
// A backend whose load is one blocking call (vLLM builds AsyncLLM on the loop thread) cannot
// give up before the call returns; the caller gets its error meanwhile.
const startCancelWait = 5 * time.Second

// close is Close waiting at most wait; only the first call shuts down and reports.
func (e *Engine) close(wait time.Duration) error {
	var err error
	e.closeOnce.Do(func() {
		e.mu.Lock()
		e.closed = true
		e.mu.Unlock()
		e.stopOnce.Do(func() { close(e.stopped) })
		e.api.send(cmdShutdown, 0, nil, 0)
		select {
		case <-e.pollerDone:
			<-e.runDone
			e.installEncoder(nil) // the next engine may have another tokenizer, or none
			releaseInterpreter()
		case <-time.After(wait):
			// The interpreter stays busy: a new Engine in this process would share a loop
			// that never ended.
			err = fmt.Errorf("engine: python did not shut down within %v", wait)
			e.log.Error(err.Error())
		}
	})
	return err
}
