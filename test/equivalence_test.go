package test

import (
	"bytes"
	"context"
	"encoding/json"
	"os/exec"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/test/internal/govtest"
)

// TestGreedyMatchesModelGenerate: the transformers backend's greedy tokens equal Hugging
// Face's own model.generate on the same checkpoint (run in a plain Python process in the same
// test run), for 32 tokens or up to EOS. On CUDA hosts (-tags gpu) both sides run on the GPU.
func TestGreedyMatchesModelGenerate(t *testing.T) {
	const n = 32
	prompts := []string{"What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var got [][]int32
	for _, p := range prompts {
		ids, _, err := run(ctx, p, n, false)
		require.NoError(t, err)
		got = append(got, ids)
	}
	in, _ := json.Marshal(prompts)
	cmd := exec.CommandContext(ctx, govtest.VenvPython(), "reference_hf.py", defaultModel(), "32", device, dtype)
	cmd.Stdin = bytes.NewReader(in)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	require.NoError(t, err, stderr.String())
	lines := bytes.Split(bytes.TrimSpace(out), []byte("\n"))
	var want [][]int32
	require.NoError(t, json.Unmarshal(lines[len(lines)-1], &want))
	require.Equal(t, want, got, "govllm's transformers backend and model.generate give the same greedy tokens")
	full := 0
	for _, ids := range got {
		if len(ids) == n {
			full++
		}
	}
	require.GreaterOrEqual(t, full, 2, "most prompts run the full 32 tokens")
}
