// Package embed holds the end-to-end tests of POST /v1/embeddings: the govllm binary with
// --runner pooling on a small BERT-shaped checkpoint with seeded random weights (written at
// setup by scripts/make_embedding_model.py), on both backends (vLLM when the venv has it, and
// transformers), through the openai Python SDK and openai-go. The vectors are checked against
// transformers' own forward pass with the model's pooling done by hand (reference_embed.py).
package embed

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/govllm/govllm/test/internal/govtest"
)

// server is one govllm binary under test.
type server struct {
	name string // the backend: "vllm" or "transformers"
	url  string
	srv  *govtest.Server
}

var (
	servers  []server
	modelDir string // the generated checkpoint
)

const (
	model  = "tiny-bert-embed" // the served name: the checkpoint directory's base name
	apiKey = "test-api-key"
)

func serveArgs(engine string) []string {
	return []string{"--engine", engine, "--model", modelDir, "--python", govtest.VenvPython(),
		"--device", "cpu", "--dtype", "float32", "--api-key", apiKey, "--runner", "pooling"}
}

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	// Generous bounds: on a loaded 2-core machine generating the model, building the binary and
	// starting vLLM take minutes each.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "govllm-embed-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	modelDir = filepath.Join(dir, model)
	gen := exec.CommandContext(ctx, govtest.VenvPython(), filepath.Join(govtest.RepoRoot(), "scripts", "make_embedding_model.py"),
		"--out", modelDir)
	if out, err := gen.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "test/embed: make_embedding_model.py: %v\n%s", err, out)
		return 1
	}
	bin, err := govtest.Build(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "test/embed:", err)
		return 1
	}
	engines := []string{"transformers"}
	if exec.Command(govtest.VenvPython(), "-c", "import vllm").Run() == nil {
		engines = append([]string{"vllm"}, engines...)
	} else {
		fmt.Println("test/embed: the venv cannot import vllm: the vllm backend is not tested")
	}
	startCtx, cancelStart := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancelStart()
	var wg sync.WaitGroup
	started := make([]server, len(engines))
	errs := make([]error, len(engines))
	for i, engine := range engines {
		wg.Go(func() {
			srv, err := govtest.Start(startCtx, bin, dir, serveArgs(engine)...)
			started[i], errs[i] = server{name: engine, srv: srv}, err
			if srv != nil {
				started[i].url = srv.URL
			}
		})
	}
	wg.Wait()
	failed := false
	for i, err := range errs {
		if err != nil {
			fmt.Fprintf(os.Stderr, "test/embed: start govllm --engine %s: %v\n", engines[i], err)
			failed = true
		} else {
			servers = append(servers, started[i])
		}
	}
	code := 1
	if !failed {
		code = m.Run()
	}
	for _, s := range servers {
		if err := s.srv.Stop(time.Minute); err != nil && code == 0 {
			fmt.Fprintf(os.Stderr, "test/embed: govllm (%s) exit: %v\n", s.name, err)
			code = 1
		}
		if code != 0 {
			fmt.Fprintf(os.Stderr, "--- govllm (%s) log ---\n%s\n", s.name, tail(s.srv.Output(), 20000))
		}
	}
	return code
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// forEach runs f as a subtest per server.
func forEach(t *testing.T, f func(t *testing.T, s server)) {
	for _, s := range servers {
		t.Run(s.name, func(t *testing.T) { f(t, s) })
	}
}
