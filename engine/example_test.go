package engine_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"

	"github.com/govllm/govllm/engine"
)

// Serve the default model in-process and stream a greedy answer. (Run `make` first: it
// bootstraps the venv and the model, and builds the shim that the package embeds.)
func ExampleEngine_Generate() {
	ctx := context.Background()
	e, err := engine.Open(ctx, engine.Config{
		Model:  filepath.Join(repoRoot(), "models", "SmolLM2-135M-Instruct"),
		Engine: "transformers",
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer e.Close()

	greedy := 0.0
	s, err := e.Generate(ctx, engine.Request{
		Messages: []engine.Message{{Role: "user", Content: "What is the capital of France?"}},
		Sampling: engine.SamplingParams{MaxTokens: 16, Temperature: &greedy},
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer s.Close() // cancelling ctx, or Close before the end, aborts the request
	for {
		d, err := s.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			fmt.Println(err)
			return
		}
		fmt.Print(d.Text)
	}
	fmt.Println()
	fmt.Println(s.Usage().CompletionTokens > 0)
	// Output:
	// The capital of France is Paris.
	// true
}
