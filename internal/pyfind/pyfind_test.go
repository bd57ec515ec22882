package pyfind_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/internal/pyfind"
)

// fakePython writes an executable that answers the probe like an interpreter would.
func fakePython(t *testing.T, answer string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "python")
	require.NoError(t, os.WriteFile(p, []byte("#!/bin/sh\ncat <<'EOF'\n"+answer+"\nEOF\n"), 0o755))
	return p
}

func venvPython(t *testing.T) string {
	p := filepath.Join(repoRoot(), ".venv", "bin", "python")
	if _, err := os.Stat(p); err != nil {
		t.Skip("no .venv: run scripts/bootstrap")
	}
	return p
}

func TestFindPythonFailuresNameTheFix(t *testing.T) {
	tests := []struct {
		name    string
		python  func(t *testing.T) string
		modules []string
		want    []string
	}{
		{
			name: "python too old",
			python: func(t *testing.T) string {
				return fakePython(t, `{"executable":"/opt/py39/bin/python","version":"3.9.18","major":3,"minor":9,"libpython":"/opt/py39/lib/libpython3.9.so.1.0","path":[]}`)
			},
			want: []string{"3.9.18", "needs Python >= 3.10", "--python"},
		},
		{
			name: "no shared libpython",
			python: func(t *testing.T) string {
				return fakePython(t, `{"executable":"/usr/local/bin/python3.12","version":"3.12.1","major":3,"minor":12,"libpython":"","lib_candidates":["/usr/local/lib/libpython3.12.so"],"path":[]}`)
			},
			want: []string{"no shared libpython", "/usr/local/lib/libpython3.12.so", "--enable-shared", "libpython3.12"},
		},
		{
			name: "free-threaded build",
			python: func(t *testing.T) string {
				return fakePython(t, `{"executable":"/usr/bin/python3.13t","version":"3.13.0","major":3,"minor":13,"libpython":"/usr/lib/libpython3.13t.so","gil_disabled":true,"path":[]}`)
			},
			want: []string{"free-threaded"},
		},
		{
			name:    "backend not importable (real interpreter)",
			python:  venvPython,
			modules: []string{"govllm_no_such_backend"},
			want:    []string{"cannot import govllm_no_such_backend", "pip install govllm_no_such_backend", "scripts/bootstrap"},
		},
		{
			name:   "not an interpreter",
			python: func(t *testing.T) string { return "/nonexistent/python3" },
			want:   []string{"/nonexistent/python3", "GOVLLM_PYTHON"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := pyfind.FindPython(context.Background(), tt.python(t), tt.modules...)
			require.ErrorIs(t, err, pyfind.ErrPythonNotFound)
			for _, w := range tt.want {
				require.ErrorContains(t, err, w)
			}
		})
	}
}

func TestFindPythonRealVenv(t *testing.T) {
	py := venvPython(t)
	info, err := pyfind.FindPython(context.Background(), py, "torch", "transformers")
	require.NoError(t, err)
	require.Equal(t, py, info.Executable, "a venv's python stays the venv's, so its site-packages apply")
	require.FileExists(t, info.LibPython)
	require.NotEqual(t, info.Prefix, info.BasePrefix, "a venv has its own prefix")
	require.GreaterOrEqual(t, info.Minor, 10)
}

func TestFindPythonStaticDebianPython(t *testing.T) {
	// Debian's /usr/bin/python3 is linked statically; without the libpython3.X package it
	// has no shared library, which must be reported, not crash.
	if _, err := exec.LookPath("/usr/bin/python3"); err != nil {
		t.Skip("no /usr/bin/python3")
	}
	info, err := pyfind.InspectPython(context.Background(), "/usr/bin/python3")
	require.NoError(t, err)
	if info.LibPython != "" {
		t.Skipf("/usr/bin/python3 has a shared libpython (%s)", info.LibPython)
	}
	require.ErrorContains(t, info.Check(), "no shared libpython")
}

// repoRoot is the module root, two levels above this package.
func repoRoot() string {
	wd, _ := os.Getwd()
	return filepath.Dir(filepath.Dir(wd))
}

func TestChooseBackend(t *testing.T) {
	py := func(missing ...string) *pyfind.PythonInfo {
		m := map[string]string{}
		for _, n := range missing {
			m[n] = "No module named " + n
		}
		return &pyfind.PythonInfo{Executable: "/venv/bin/python", Missing: m}
	}
	for _, tc := range []struct {
		name, engine string
		py           *pyfind.PythonInfo
		want, err    string
	}{
		{"auto with vllm", "auto", py(), "vllm", ""},
		{"auto without vllm", "auto", py("vllm"), "transformers", ""},
		{"auto with nothing", "auto", py("vllm", "torch"), "", "can import neither vllm nor transformers+torch"},
		{"explicit", "transformers", py("vllm"), "transformers", ""},
		{"custom", "mypkg.backend:create", py("vllm", "torch", "transformers"), "mypkg.backend:create", ""},
		{"unknown", "llama.cpp", py(), "", `unknown engine "llama.cpp": use --engine auto, vllm, transformers (or module:attr for a custom backend)`},
		{"half custom", "mod:", py(), "", "unknown engine"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := pyfind.ChooseBackend(tc.engine, tc.py)
			if tc.err != "" {
				require.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, got)
		})
	}
}
