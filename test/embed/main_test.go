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
	"testing"
	"time"

	"github.com/govllm/govllm/test/internal/govtest"
)

// server is one govllm binary under test.
type server = govtest.Backend

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
	startCtx, cancelStart := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancelStart()
	started, ok := govtest.StartBackends(startCtx, "test/embed", bin, dir, govtest.Engines("test/embed"), serveArgs)
	servers = started
	code := 1
	if ok {
		code = m.Run()
	}
	code = govtest.StopBackends("test/embed", servers, code)
	return code
}

// forEach runs f as a subtest per server.
func forEach(t *testing.T, f func(t *testing.T, s server)) {
	for _, s := range servers {
		t.Run(s.Name, func(t *testing.T) { f(t, s) })
	}
}
