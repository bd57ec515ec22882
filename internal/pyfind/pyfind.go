// Package pyfind finds the Python interpreter govllm embeds and says what it can run: it asks
// the interpreter itself (one subprocess, no import of the backends) for its version, its shared
// libpython, its sys.prefix and sys.path, and which backend modules it can import. It holds the
// list of engine names and the rule that resolves "auto", so that the launch plan, the engine
// and the registry agree on them. Pure Go: no cgo, no purego.
package pyfind

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// ErrPythonNotFound means no usable Python interpreter was found.
var ErrPythonNotFound = errors.New("engine: no usable python")

// PythonInfo is what an interpreter reports about itself: enough to embed it.
type PythonInfo struct {
	// Executable is the interpreter that was asked (a venv's python stays the venv's python).
	Executable string `json:"executable"`
	// Version is the full version string, e.g. "3.11.7".
	Version string `json:"version"`
	// Major and Minor are the version numbers.
	Major int `json:"major"`
	Minor int `json:"minor"`
	// LibPython is the absolute path of the shared libpython, or "" when there is none.
	LibPython string `json:"libpython"`
	// LibCandidates lists where LibPython was looked for, for error messages.
	LibCandidates []string `json:"lib_candidates"`
	// Prefix, ExecPrefix, BasePrefix and BaseExecPrefix are sys's values.
	Prefix         string `json:"prefix"`
	ExecPrefix     string `json:"exec_prefix"`
	BasePrefix     string `json:"base_prefix"`
	BaseExecPrefix string `json:"base_exec_prefix"`
	// Path is the interpreter's sys.path.
	Path []string `json:"path"`
	// GILDisabled is true for free-threaded builds, which cannot load the stable-ABI shim.
	GILDisabled bool `json:"gil_disabled"`
	// Missing maps each module that was asked for and cannot be imported to the import error.
	Missing map[string]string `json:"missing"`
}

// probeScript runs inside the candidate interpreter. It must work on any Python 3, so that an
// old interpreter gets a clear version error rather than a syntax error.
const probeScript = `
import json, os, sys, sysconfig, importlib.util
cv = sysconfig.get_config_var
libdir = cv("LIBDIR") or ""
names = []
for k in ("INSTSONAME", "LDLIBRARY"):
    n = cv(k)
    if n and ".so" in n and n not in names:
        names.append(n)
ver = "%d.%d" % sys.version_info[:2]
for n in ("libpython%s%s.so.1.0" % (ver, getattr(sys, "abiflags", "")), "libpython%s.so" % ver):
    if n not in names:
        names.append(n)
dirs = [d for d in (libdir, cv("LIBPL"), os.path.join(sys.base_prefix, "lib"), os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))), "lib")) if d]
cands, lib = [], ""
for d in dirs:
    for n in names:
        p = os.path.join(d, n)
        cands.append(p)
        if not lib and os.path.isfile(p):
            lib = os.path.realpath(p)
missing = {}
for m in [a for a in sys.argv[1:] if a]:
    try:
        if importlib.util.find_spec(m) is None:
            missing[m] = "No module named %r" % m
    except Exception as e:
        missing[m] = "%s: %s" % (type(e).__name__, e)
print(json.dumps(dict(executable=sys.executable, version=sys.version.split()[0],
    major=sys.version_info[0], minor=sys.version_info[1], libpython=lib, lib_candidates=cands,
    prefix=sys.prefix, exec_prefix=sys.exec_prefix, base_prefix=sys.base_prefix,
    base_exec_prefix=sys.base_exec_prefix, path=sys.path,
    gil_disabled=bool(cv("Py_GIL_DISABLED")), missing=missing)))
`

// InspectPython runs the interpreter exe once and reports how to embed it. modules are checked
// for importability (without importing them) and reported in PythonInfo.Missing.
func InspectPython(ctx context.Context, exe string, modules ...string) (*PythonInfo, error) {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, exe, append([]string{"-c", probeScript}, modules...)...)
	cmd.Env = append(os.Environ(), "PYTHONNOUSERSITE=1")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = err.Error()
		}
		return nil, fmt.Errorf("%w: running %s failed: %s (point --python or GOVLLM_PYTHON at a working Python >= 3.10)", ErrPythonNotFound, exe, msg)
	}
	var info PythonInfo
	if err := json.Unmarshal(lastLine(out), &info); err != nil {
		return nil, fmt.Errorf("%w: %s answered the probe with %q: %v", ErrPythonNotFound, exe, strings.TrimSpace(string(out)), err)
	}
	// sys.executable is what the interpreter calls itself: a venv's python stays the venv's
	// (so its site-packages apply), and a launcher such as pyenv's shim resolves to the real one.
	if info.Executable == "" {
		info.Executable = exe
	}
	return &info, nil
}

// Check reports, with the fix, why this interpreter cannot be embedded: too old, no shared
// libpython, free-threaded, or a required module missing.
func (p *PythonInfo) Check() error {
	if p.Major < 3 || (p.Major == 3 && p.Minor < 10) {
		return fmt.Errorf("%w: %s is Python %s; govllm needs Python >= 3.10: point --python (or GOVLLM_PYTHON) at a newer interpreter, or run scripts/bootstrap", ErrPythonNotFound, p.Executable, p.Version)
	}
	if p.GILDisabled {
		return fmt.Errorf("%w: %s is a free-threaded build (Python %s), which cannot load the stable-ABI shim: use a regular (GIL) build", ErrPythonNotFound, p.Executable, p.Version)
	}
	if p.LibPython == "" {
		return fmt.Errorf("%w: %s (Python %s) has no shared libpython (looked for %s): install one (Debian: apt-get install libpython%d.%d; pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install %s) or point --python at an interpreter built with --enable-shared",
			ErrPythonNotFound, p.Executable, p.Version, strings.Join(p.LibCandidates, ", "), p.Major, p.Minor, p.Version)
	}
	if len(p.Missing) > 0 {
		var names, why []string
		for m, e := range p.Missing {
			names = append(names, m)
			why = append(why, m+": "+e)
		}
		return fmt.Errorf("%w: %s cannot import %s (%s): run scripts/bootstrap, or install it with `%s -m pip install %s`, or point --python at a venv that has it",
			ErrPythonNotFound, p.Executable, strings.Join(names, ", "), strings.Join(why, "; "), p.Executable, strings.Join(names, " "))
	}
	return nil
}

// FindPython picks the interpreter to embed: explicit (the --python flag), then $GOVLLM_PYTHON,
// then the project's .venv (searched upwards from the executable and the working directory),
// then $VIRTUAL_ENV/bin/python, then the first python3 on PATH that can import modules.
func FindPython(ctx context.Context, explicit string, modules ...string) (*PythonInfo, error) {
	try := func(exe string) (*PythonInfo, error) {
		info, err := InspectPython(ctx, exe, modules...)
		if err != nil {
			return nil, err
		}
		return info, info.Check()
	}
	for _, exe := range []string{explicit, os.Getenv("GOVLLM_PYTHON")} {
		if exe != "" {
			return try(exe)
		}
	}
	var candidates []string
	candidates = append(candidates, projectVenvs()...)
	if v := os.Getenv("VIRTUAL_ENV"); v != "" {
		candidates = append(candidates, filepath.Join(v, "bin", "python"))
	}
	var firstErr error
	for _, exe := range candidates {
		if _, err := os.Stat(exe); err != nil {
			continue
		}
		info, err := try(exe)
		if err == nil {
			return info, nil
		}
		if firstErr == nil {
			firstErr = err
		}
	}
	if lp, err := exec.LookPath("python3"); err == nil {
		info, err := try(lp)
		if err == nil {
			return info, nil
		}
		if firstErr == nil {
			firstErr = err
		}
	}
	if firstErr != nil {
		return nil, firstErr
	}
	return nil, fmt.Errorf("%w: no .venv, $VIRTUAL_ENV or python3 found: run scripts/bootstrap or pass --python", ErrPythonNotFound)
}

// projectVenvs lists .venv/bin/python candidates above the executable and the working directory.
func projectVenvs() []string {
	var out []string
	for _, d := range SearchDirs() {
		out = append(out, filepath.Join(d, ".venv", "bin", "python"))
	}
	return out
}

// SearchDirs lists the directory of the running executable and the working directory, each
// followed by its ancestors, without repeats: where govllm looks for the project's .venv and
// models/ when none is named.
func SearchDirs() []string {
	var starts []string
	if exe, err := os.Executable(); err == nil {
		if r, err := filepath.EvalSymlinks(exe); err == nil {
			exe = r
		}
		starts = append(starts, filepath.Dir(exe))
	}
	if wd, err := os.Getwd(); err == nil {
		starts = append(starts, wd)
	}
	seen := map[string]bool{}
	var out []string
	for _, dir := range starts {
		for d := dir; ; d = filepath.Dir(d) {
			if !seen[d] {
				seen[d] = true
				out = append(out, d)
			}
			if filepath.Dir(d) == d {
				break
			}
		}
	}
	return out
}

func lastLine(b []byte) []byte {
	b = bytes.TrimSpace(b)
	if i := bytes.LastIndexByte(b, '\n'); i >= 0 {
		return b[i+1:]
	}
	return b
}
