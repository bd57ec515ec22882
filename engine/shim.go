package engine

import (
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"sync"
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
	init      func(programName, pythonHome string, queueBytes int64) int32
	open      func()
	run       func(code string) int32
	send      func(kind int32, reqID int64, data *byte, n int64) int32
	poll      func(timeoutMS, coalesceUS int32) int64
	polled    func() unsafe.Pointer
	lastError func() string
}

// Commands from Go to the bridge (shim_send kinds).
const (
	cmdSubmit   = 1
	cmdAbort    = 2
	cmdShutdown = 3
	cmdStats    = 4
)

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
	h, err := purego.Dlopen(shimPath, purego.RTLD_NOW|purego.RTLD_GLOBAL)
	if err != nil {
		return nil, fmt.Errorf("%w: dlopen %s: %v", ErrShim, shimPath, err)
	}
	api := &shimAPI{}
	purego.RegisterLibFunc(&api.init, h, "shim_init")
	purego.RegisterLibFunc(&api.run, h, "shim_run")
	purego.RegisterLibFunc(&api.open, h, "shim_open")
	purego.RegisterLibFunc(&api.send, h, "shim_send")
	purego.RegisterLibFunc(&api.poll, h, "shim_poll")
	purego.RegisterLibFunc(&api.polled, h, "shim_polled")
	purego.RegisterLibFunc(&api.lastError, h, "shim_last_error")
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
