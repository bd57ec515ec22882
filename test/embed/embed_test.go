package embed

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/test/internal/govtest"
)

// TestEmbeddingsPythonSDK runs embeddings_test.py (the openai Python SDK: float and base64,
// dimensions, token inputs, the 400s) against every server.
func TestEmbeddingsPythonSDK(t *testing.T) {
	forEach(t, func(t *testing.T, s server) {
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, govtest.VenvPython(), "-m", "pytest", "-q", "-p", "no:cacheprovider", "embeddings_test.py")
		cmd.Env = append(os.Environ(), "GOVLLM_URL="+s.URL, "GOVLLM_MODEL="+model, "GOVLLM_MODEL_DIR="+modelDir,
			"GOVLLM_BACKEND="+s.Name, "GOVLLM_API_KEY="+apiKey)
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "pytest against %s:\n%s", s.Name, out)
		t.Logf("%s", govtest.Tail(string(out), 400))
	})
}

// reference computes the expected vectors with transformers (reference_embed.py).
func reference(t *testing.T, texts []string) [][]float64 {
	t.Helper()
	in, err := json.Marshal(texts)
	require.NoError(t, err)
	cmd := exec.CommandContext(t.Context(), govtest.VenvPython(), filepath.Join(".", "reference_embed.py"), modelDir)
	cmd.Stdin = bytes.NewReader(in)
	cmd.Env = append(os.Environ(), "HF_HUB_OFFLINE=1")
	out, err := cmd.Output()
	require.NoError(t, err)
	var vecs [][]float64
	require.NoError(t, json.Unmarshal(out, &vecs))
	return vecs
}

// TestEmbeddingsOpenAIGo checks openai-go's Embeddings.New (float and base64) against the
// reference forward pass to 1e-4, and that a chat request on the pooling runner is a 400.
func TestEmbeddingsOpenAIGo(t *testing.T) {
	texts := []string{"Hello, the quick brown fox jumps over the lazy dog!", "one two three", "blue sky"}
	want := reference(t, texts)
	forEach(t, func(t *testing.T, s server) {
		client := openai.NewClient(option.WithBaseURL(s.URL+"/v1"), option.WithAPIKey(apiKey), option.WithMaxRetries(0))
		for _, format := range []openai.EmbeddingNewParamsEncodingFormat{
			openai.EmbeddingNewParamsEncodingFormatFloat, openai.EmbeddingNewParamsEncodingFormatBase64,
		} {
			t.Run(string(format), func(t *testing.T) {
				resp, err := client.Embeddings.New(t.Context(), openai.EmbeddingNewParams{
					Model:          model,
					Input:          openai.EmbeddingNewParamsInputUnion{OfArrayOfStrings: texts},
					EncodingFormat: format,
				})
				require.NoError(t, err)
				require.Equal(t, model, resp.Model)
				require.Len(t, resp.Data, len(texts))
				require.Positive(t, resp.Usage.PromptTokens)
				require.Equal(t, resp.Usage.PromptTokens, resp.Usage.TotalTokens)
				for i, d := range resp.Data {
					require.Equal(t, int64(i), d.Index)
					got := d.Embedding
					if format == openai.EmbeddingNewParamsEncodingFormatBase64 {
						got = decodeBase64(t, d.RawJSON()) // openai-go leaves a base64 embedding as raw JSON
					}
					require.InDeltaSlice(t, want[i], got, 1e-4, "input %d", i)
				}
			})
		}
		t.Run("chat is refused on the pooling runner", func(t *testing.T) {
			_, err := client.Chat.Completions.New(t.Context(), openai.ChatCompletionNewParams{
				Model:    model,
				Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
			})
			var apiErr *openai.Error
			require.True(t, errors.As(err, &apiErr), "err: %v", err)
			require.Equal(t, http.StatusBadRequest, apiErr.StatusCode)
			require.Contains(t, apiErr.Message, "--runner")
		})
	})
}

// decodeBase64 reads a base64 embedding (little-endian float32s) from its item's raw JSON.
func decodeBase64(t *testing.T, raw string) []float64 {
	t.Helper()
	var item struct {
		Embedding string `json:"embedding"`
	}
	require.NoError(t, json.Unmarshal([]byte(raw), &item))
	b, err := base64.StdEncoding.DecodeString(item.Embedding)
	require.NoError(t, err)
	require.Zero(t, len(b)%4)
	out := make([]float64, len(b)/4)
	for i := range out {
		out[i] = float64(math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:])))
	}
	return out
}
