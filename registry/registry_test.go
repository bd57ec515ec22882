package registry

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	// A child process of TestConcurrentAdds: add entries, then exit.
	if path := os.Getenv("GOVLLM_REGISTRY_TEST_ADD"); path != "" {
		prefix := os.Getenv("GOVLLM_REGISTRY_TEST_PREFIX")
		model := os.Getenv("GOVLLM_REGISTRY_TEST_MODEL")
		for i := range 10 {
			if _, err := Open(path).Add(Entry{Name: fmt.Sprintf("%s-%d", prefix, i), Model: model}, false); err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
		}
		os.Exit(0)
	}
	goleak.VerifyTestMain(m)
}

// modelDir makes a directory that looks like a checkpoint.
func modelDir(t *testing.T) string {
	t.Helper()
	d := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(d, "config.json"), []byte(`{}`), 0o644))
	return d
}

func TestNormalize(t *testing.T) {
	model := modelDir(t)
	noConfig := t.TempDir()
	aFile := filepath.Join(noConfig, "weights.bin")
	require.NoError(t, os.WriteFile(aFile, nil, 0o644))
	python := aFile
	for _, tc := range []struct {
		name  string
		entry Entry
		err   string
		check func(t *testing.T, e Entry)
	}{
		{name: "defaults", entry: Entry{Name: "a", Model: model}, check: func(t *testing.T, e Entry) {
			require.Equal(t, "auto", e.Engine)
			require.Equal(t, DefaultHost, e.Host)
			require.Equal(t, model, e.Model)
			require.False(t, e.Remote())
		}},
		{name: "vllm with tensor parallelism", entry: Entry{Name: "big.model_2", Model: model, Engine: "vllm", TensorParallel: 4, Port: 9000, Python: python}},
		{name: "custom backend", entry: Entry{Name: "c", Model: model, Engine: "mybackend:create"}},
		{name: "bad name", entry: Entry{Name: "no spaces", Model: model}, err: `server name "no spaces": use letters, digits`},
		{name: "empty name", entry: Entry{Model: model}, err: `server name ""`},
		{name: "name with a slash", entry: Entry{Name: "../x", Model: model}, err: "server name"},
		{name: "unknown engine", entry: Entry{Name: "a", Model: model, Engine: "tgi"},
			err: `unknown engine "tgi": use --engine auto, vllm, transformers (or module:attr for a custom backend)`},
		{name: "no model", entry: Entry{Name: "a"}, err: "no model: pass --model DIR"},
		{name: "missing model dir", entry: Entry{Name: "a", Model: filepath.Join(noConfig, "nope")},
			err: "does not exist: pass --model DIR (a Hugging Face checkpoint directory), or run scripts/bootstrap (make bootstrap)"},
		{name: "model is a file", entry: Entry{Name: "a", Model: aFile}, err: "is not a directory: pass --model DIR"},
		{name: "model without config.json", entry: Entry{Name: "a", Model: noConfig}, err: "has no config.json"},
		{name: "negative tensor parallel", entry: Entry{Name: "a", Model: model, TensorParallel: -1}, err: "--tensor-parallel -1"},
		{name: "port out of range", entry: Entry{Name: "a", Model: model, Port: 70000}, err: "--port 70000: use 1 to 65535"},
		{name: "missing python", entry: Entry{Name: "a", Model: model, Python: "/no/such/python"}, err: "--python /no/such/python: no such file"},
		{name: "remote", entry: Entry{Name: "r", EndpointURL: "http://gpu-box:8000/v1/"}, check: func(t *testing.T, e Entry) {
			require.True(t, e.Remote())
			require.Equal(t, "http://gpu-box:8000", e.EndpointURL)
			require.Equal(t, "http://gpu-box:8000", e.URL())
			require.Empty(t, e.Engine)
		}},
		{name: "remote with a path", entry: Entry{Name: "r", EndpointURL: "https://api.example.com/openai/v1"}, check: func(t *testing.T, e Entry) {
			require.Equal(t, "https://api.example.com/openai", e.EndpointURL)
		}},
		{name: "remote with local flags", entry: Entry{Name: "r", EndpointURL: "http://h:1", Model: model, Port: 3},
			err: "--endpoint-url names a remote server, which govllm does not start: drop --model, --port"},
		{name: "remote without scheme", entry: Entry{Name: "r", EndpointURL: "gpu-box:8000"}, err: `--endpoint-url "gpu-box:8000": want http://HOST[:PORT]`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := tc.entry
			err := e.Normalize()
			if tc.err != "" {
				require.ErrorIs(t, err, ErrInvalid)
				require.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			if tc.check != nil {
				tc.check(t, e)
			}
		})
	}
}

func TestEntryURLAndArgs(t *testing.T) {
	e := Entry{Name: "a", Model: "/m", Engine: "vllm", Host: "0.0.0.0", Port: 8001, TensorParallel: 2, Python: "/py", GPUs: "0,1",
		Args: []string{"--max-model-len", "4096"}}
	require.Equal(t, "http://127.0.0.1:8001", e.URL())
	require.Equal(t, []string{"serve", "--host", "0.0.0.0", "--port", "8001", "--model", "/m", "--engine", "vllm",
		"--tensor-parallel-size", "2", "--python", "/py", "--gpus", "0,1", "--max-model-len", "4096"}, e.ServeArgs())
	e = Entry{Name: "b", Model: "/m", Engine: "auto", Host: "::1", Port: 9}
	require.Equal(t, "http://[::1]:9", e.URL())
	require.Equal(t, []string{"serve", "--host", "::1", "--port", "9", "--model", "/m", "--engine", "auto"}, e.ServeArgs())
}

func TestXDGPaths(t *testing.T) {
	t.Setenv("HOME", "/home/u")
	t.Setenv("XDG_CONFIG_HOME", "")
	p, err := DefaultPath()
	require.NoError(t, err)
	require.Equal(t, "/home/u/.config/govllm/servers.json", p)

	t.Setenv("XDG_CONFIG_HOME", "/cfg")
	p, _ = DefaultPath()
	require.Equal(t, "/cfg/govllm/servers.json", p)

	t.Setenv("XDG_CONFIG_HOME", "relative/dir") // ignored, as the spec says
	p, _ = DefaultPath()
	require.Equal(t, "/home/u/.config/govllm/servers.json", p)
}

func TestStore(t *testing.T) {
	model := modelDir(t)
	s := Open(filepath.Join(t.TempDir(), "govllm", "servers.json"))
	list, err := s.List()
	require.NoError(t, err)
	require.Empty(t, list, "no file: an empty registry")

	b, err := s.Add(Entry{Name: "b", Model: model}, false)
	require.NoError(t, err)
	require.Equal(t, DefaultPort, b.Port, "the first local entry gets the default port")
	require.False(t, b.Added.IsZero())
	a, err := s.Add(Entry{Name: "a", Model: model, Engine: "transformers"}, false)
	require.NoError(t, err)
	require.Equal(t, DefaultPort+1, a.Port, "the next free port")
	_, err = s.Add(Entry{Name: "r", EndpointURL: "http://h:8000"}, false)
	require.NoError(t, err)
	c, err := s.Add(Entry{Name: "c", Model: model, Host: "0.0.0.0"}, false)
	require.NoError(t, err)
	require.Equal(t, DefaultPort, c.Port, "ports are per host")

	list, err = s.List()
	require.NoError(t, err)
	require.Equal(t, []string{"a", "b", "c", "r"}, names(list), "sorted by name")

	_, err = s.Add(Entry{Name: "a", Model: model}, false)
	require.ErrorIs(t, err, ErrExists)
	require.ErrorContains(t, err, `"a" is already registered`)
	require.ErrorContains(t, err, "pass --replace")
	a2, err := s.Add(Entry{Name: "a", Model: model, Engine: "vllm", Port: 9000}, true)
	require.NoError(t, err)
	got, err := s.Get("a")
	require.NoError(t, err)
	require.Equal(t, a2, got)
	require.Equal(t, "vllm", got.Engine)

	_, err = s.Add(Entry{Name: "bad", Model: model, Engine: "nope"}, false)
	require.ErrorIs(t, err, ErrInvalid)

	require.NoError(t, s.Remove("b"))
	require.ErrorIs(t, s.Remove("b"), ErrNotFound)
	_, err = s.Get("b")
	require.ErrorIs(t, err, ErrNotFound)
	require.ErrorContains(t, err, "govllm server add b --model DIR")

	// The file: versioned JSON, nothing left over from the atomic writes.
	raw, err := os.ReadFile(s.Path())
	require.NoError(t, err)
	var f struct {
		Version int               `json:"version"`
		Servers []json.RawMessage `json:"servers"`
	}
	require.NoError(t, json.Unmarshal(raw, &f))
	require.Equal(t, 1, f.Version)
	require.Len(t, f.Servers, 3)
	files, err := os.ReadDir(filepath.Dir(s.Path()))
	require.NoError(t, err)
	var fnames []string
	for _, e := range files {
		fnames = append(fnames, e.Name())
	}
	require.ElementsMatch(t, []string{"servers.json", "servers.json.lock"}, fnames)

	require.NoError(t, os.WriteFile(s.Path(), []byte("{not json"), 0o644))
	_, err = s.List()
	require.ErrorContains(t, err, "is not a server registry")
}

func names(es []Entry) []string {
	var out []string
	for _, e := range es {
		out = append(out, e.Name)
	}
	return out
}

// TestConcurrentAdds: goroutines and other processes add entries at once; none is lost.
func TestConcurrentAdds(t *testing.T) {
	model := modelDir(t)
	path := filepath.Join(t.TempDir(), "servers.json")
	var procs []*exec.Cmd
	for p := range 3 {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), "GOVLLM_REGISTRY_TEST_ADD="+path, "GOVLLM_REGISTRY_TEST_PREFIX=proc"+strconv.Itoa(p),
			"GOVLLM_REGISTRY_TEST_MODEL="+model)
		cmd.Stderr = os.Stderr
		require.NoError(t, cmd.Start())
		procs = append(procs, cmd)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for i := range 20 {
		wg.Go(func() {
			_, err := Open(path).Add(Entry{Name: fmt.Sprintf("g-%d", i), Model: model}, false)
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	for _, p := range procs {
		require.NoError(t, p.Wait())
	}
	list, err := Open(path).List()
	require.NoError(t, err)
	require.Len(t, list, 50)
	ports := map[int]string{}
	for _, e := range list {
		require.NotContains(t, ports, e.Port, "%s and %s got the same port", e.Name, ports[e.Port])
		ports[e.Port] = e.Name
	}
}
