package engine

import (
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"
	"unsafe"

	"github.com/ebitengine/purego"
)

// The shim and the Python package travel inside the binary, so `govllm serve` runs from any
// directory: on first use they are written to a content-addressed folder under the user's cache
// dir ($GOVLLM_CACHE_DIR, else $XDG_CACHE_HOME/govllm or ~/.cache/govllm).

//go:embed shim/libgovllm_shim.so
var shimLibrary []byte

//go:embed python/govllm/*.py python/govllm/backends/*.py python/govllm/backends/hf/*.py
var pythonPackage embed.FS

// shimAPI holds the C entry points of cshim/shim.h.
type shimAPI struct {
	init          func(programName, pythonHome string, queueBytes int64) int32
	open          func()
	run           func(code string) int32
	send          func(kind int32, reqID int64, data *byte, n int64) int32
	poll          func(timeoutMS, coalesceUS int32, batch *unsafe.Pointer) int64
	lastErrorInto func(buf *byte, n int64) int64 // shim_last_error; lastError wraps it
	setEncoder    func(fn uintptr)               // shim_set_encoder
}

// lastError returns the shim's last error text. The shim copies it into buf under its lock, so
// a concurrent error (many requests failing at once) cannot free it under the copy; a text
// longer than buf is asked for again with room for it.
func (a *shimAPI) lastError() string {
	buf := make([]byte, 1024)
	for {
		n := a.lastErrorInto(&buf[0], int64(len(buf)))
		if n < int64(len(buf)) {
			return string(buf[:n])
		}
		buf = make([]byte, n+1) // the text may have changed meanwhile: the loop checks again
	}
}

// Commands from Go to the bridge: shim_send's kinds, SHIM_CMD_* in cshim/shim.h (checked by
// codes_test.go).
const (
	cmdSubmit   = 1
	cmdAbort    = 2
	cmdShutdown = 3
	cmdStats    = 4
	// cmdStopChoice stops one choice (data: its index in decimal): Go matched a stop string.
	cmdStopChoice = 5
	// cmdParse sends a choice's output to the backend's parsers (parse.go); evParsed answers.
	cmdParse = 6
	// cmdTokenize asks the bridge to tokenize or detokenize (evTokenized answers).
	cmdTokenize = 7
	// cmdEmbed asks the backend for embeddings (evEmbedding answers).
	cmdEmbed = 8
)

// maxQueueBytes caps Config.QueueBytes (SHIM_MAX_QUEUE_BYTES in cshim/shim.h): records carry
// u32 lengths, and with two buffers of at most 2 GiB no record that fits can overflow them.
const maxQueueBytes = 1 << 32

// coalesceMicros converts Config.PollCoalesce into shim_poll's coalesce_us, clamped to int32
// (none for zero or less).
func coalesceMicros(d time.Duration) int32 {
	us := d / time.Microsecond
	switch {
	case us <= 0:
		return 0
	case us > math.MaxInt32:
		return math.MaxInt32
	}
	return int32(us)
}

// interpreter is the process's one embedded CPython. Its main thread is a goroutine locked to
// its OS thread for the life of the process; engines run on it one after another.
type interpreter struct {
	api       *shimAPI
	libpython string
	jobs      chan runJob
}

// runJob is one engine's boot code; done receives shim_run's outcome.
type runJob struct {
	boot string
	done chan error
}

var (
	interpMu sync.Mutex
	interp   *interpreter
	busy     bool // an Engine is open on interp
)

// acquireInterpreter returns the process's interpreter, starting it on first use, and marks it
// busy until releaseInterpreter. Only one Engine runs at a time; a second one with another
// libpython is refused, since a process can load only one.
func acquireInterpreter(py *PythonInfo, shimPath string, queueBytes int64) (*interpreter, error) {
	interpMu.Lock()
	defer interpMu.Unlock()
	if busy {
		return nil, ErrAlreadyStarted
	}
	if interp != nil {
		if interp.libpython != py.LibPython {
			return nil, fmt.Errorf("%w: this process already embeds %s and cannot load %s", ErrAlreadyStarted, interp.libpython, py.LibPython)
		}
		busy = true
		return interp, nil
	}
	api, err := loadShim(py.LibPython, shimPath)
	if err != nil {
		return nil, err
	}
	it := &interpreter{api: api, libpython: py.LibPython, jobs: make(chan runJob)}
	initErr := make(chan error, 1)
	go it.mainThread(py, queueBytes, initErr)
	if err := <-initErr; err != nil {
		return nil, err
	}
	interp = it
	busy = true
	return it, nil
}

func releaseInterpreter() {
	interpMu.Lock()
	busy = false
	interpMu.Unlock()
}

// mainThread initializes CPython and then runs one engine's bridge after another. It owns the
// interpreter's main thread, where vLLM and others may call signal.signal.
func (it *interpreter) mainThread(py *PythonInfo, queueBytes int64, initErr chan<- error) {
	runtime.LockOSThread() // never unlocked: Python's main thread must stay this OS thread
	if rc := it.api.init(py.Executable, py.BasePrefix, queueBytes); rc != 0 {
		// The goroutine ends locked to its thread, so Go ends the thread; shim_init released
		// the GIL first if it had started the interpreter.
		initErr <- fmt.Errorf("%w: initialize %s: %s", ErrShim, py.LibPython, it.api.lastError())
		return
	}
	initErr <- nil
	for job := range it.jobs {
		var err error
		if rc := it.api.run(job.boot); rc != 0 {
			err = fmt.Errorf("engine: python bridge exited: %s", it.api.lastError())
		}
		job.done <- err
	}
}

// loadShim dlopens libpython (RTLD_GLOBAL, so extension modules and the shim resolve Py* from
// it) and then the shim.
func loadShim(libpython, shimPath string) (*shimAPI, error) {
	if _, err := purego.Dlopen(libpython, purego.RTLD_NOW|purego.RTLD_GLOBAL); err != nil {
		return nil, fmt.Errorf("%w: dlopen %s: %v", ErrShim, libpython, err)
	}
	return openShim(shimPath)
}

// openShim dlopens the shim and binds its entry points. A shim that lacks one (a stale or
// foreign file where the cache should hold this build's) is an error naming the symbol, and is
// closed again; purego.RegisterLibFunc would panic instead.
func openShim(path string) (*shimAPI, error) {
	h, err := purego.Dlopen(path, purego.RTLD_NOW|purego.RTLD_GLOBAL)
	if err != nil {
		return nil, fmt.Errorf("%w: dlopen %s: %v", ErrShim, path, err)
	}
	api := &shimAPI{}
	for _, f := range []struct {
		fn   any // pointer to the func field
		name string
	}{
		{&api.init, "shim_init"},
		{&api.open, "shim_open"},
		{&api.run, "shim_run"},
		{&api.send, "shim_send"},
		{&api.poll, "shim_poll"},
		{&api.lastErrorInto, "shim_last_error"},
		{&api.setEncoder, "shim_set_encoder"},
	} {
		sym, err := purego.Dlsym(h, f.name)
		if err != nil {
			_ = purego.Dlclose(h)
			return nil, fmt.Errorf("%w: %s has no %s (not this build's shim: remove it, or clear the cache dir): %v", ErrShim, path, f.name, err)
		}
		purego.RegisterFunc(f.fn, sym)
	}
	return api, nil
}

// cacheDir is where the embedded files are unpacked.
func cacheDir() (string, error) {
	if d := os.Getenv("GOVLLM_CACHE_DIR"); d != "" {
		return d, nil
	}
	d, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("engine: no cache dir (set GOVLLM_CACHE_DIR): %w", err)
	}
	return filepath.Join(d, "govllm"), nil
}

// unpackRuntime writes the shim and the Python package into the cache (once per content) and
// returns the shim's path and the directory to put on sys.path.
func unpackRuntime() (shimPath, pyDir string, err error) {
	root, err := cacheDir()
	if err != nil {
		return "", "", err
	}
	h := sha256.New()
	h.Write(shimLibrary)
	files := map[string][]byte{"libgovllm_shim.so": shimLibrary}
	err = fs.WalkDir(pythonPackage, "python", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := pythonPackage.ReadFile(p)
		if err != nil {
			return err
		}
		h.Write([]byte(p))
		h.Write(b)
		files[p] = b
		return nil
	})
	if err != nil {
		return "", "", fmt.Errorf("engine: read embedded python package: %w", err)
	}
	dir := filepath.Join(root, "runtime-"+hex.EncodeToString(h.Sum(nil))[:16])
	if _, err := os.Stat(filepath.Join(dir, ".complete")); err != nil {
		// Unpack into a private temp dir and rename it into place, so concurrent starts and
		// interrupted runs never see half a runtime.
		if err := os.MkdirAll(root, 0o755); err != nil {
			return "", "", fmt.Errorf("engine: create cache dir %s: %w", root, err)
		}
		tmp, err := os.MkdirTemp(root, ".unpack-")
		if err != nil {
			return "", "", fmt.Errorf("engine: unpack runtime: %w", err)
		}
		defer os.RemoveAll(tmp)
		for name, b := range files {
			p := filepath.Join(tmp, filepath.FromSlash(name))
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return "", "", fmt.Errorf("engine: unpack runtime: %w", err)
			}
			if err := os.WriteFile(p, b, 0o644); err != nil {
				return "", "", fmt.Errorf("engine: unpack runtime: %w", err)
			}
		}
		if err := os.WriteFile(filepath.Join(tmp, ".complete"), nil, 0o644); err != nil {
			return "", "", fmt.Errorf("engine: unpack runtime: %w", err)
		}
		if err := os.Rename(tmp, dir); err != nil {
			if _, statErr := os.Stat(filepath.Join(dir, ".complete")); statErr != nil {
				return "", "", fmt.Errorf("engine: unpack runtime into %s: %w", dir, err)
			}
			// Another process won the race; its copy is identical.
		}
	}
	return filepath.Join(dir, "libgovllm_shim.so"), filepath.Join(dir, "python"), nil
}
