package engine

import (
	"encoding/binary"
	"encoding/json"
	"math"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/llm"
)

// embedMeta frames an evEmbedding's meta as the bridge does (govllm/embedding.py pack).
func embedMeta(t *testing.T, header any, floats ...float32) []byte {
	t.Helper()
	h, err := json.Marshal(header)
	require.NoError(t, err)
	b := binary.LittleEndian.AppendUint32(nil, uint32(len(h)))
	b = append(b, h...)
	for _, f := range floats {
		b = binary.LittleEndian.AppendUint32(b, math.Float32bits(f))
	}
	return b
}

func TestDecodeEmbedding(t *testing.T) {
	t.Run("vectors", func(t *testing.T) {
		meta := embedMeta(t, map[string]int{"count": 2, "dim": 3, "prompt_tokens": 7}, 1, 2, 3, -4, 5.5, 1e-7)
		r, err := decodeEmbedding(meta)
		require.NoError(t, err)
		require.Equal(t, llm.EmbedResult{Vectors: [][]float32{{1, 2, 3}, {-4, 5.5, 1e-7}}, PromptTokens: 7}, r)
	})
	t.Run("the backend's error", func(t *testing.T) {
		meta := embedMeta(t, map[string]any{"error": map[string]any{"status": 400, "type": "BadRequestError",
			"message": "too long", "param": "input"}})
		_, err := decodeEmbedding(meta)
		var re *RequestError
		require.ErrorAs(t, err, &re)
		require.Equal(t, RequestError{Status: 400, Type: "BadRequestError", Param: "input", Message: "too long"}, *re)
	})
	for name, meta := range map[string][]byte{
		"short":           {1, 0},
		"header too long": {200, 0, 0, 0, '{'},
		"bad json":        append([]byte{1, 0, 0, 0}, '{'),
		"size mismatch":   embedMeta(t, map[string]int{"count": 2, "dim": 2}, 1, 2, 3),
	} {
		t.Run(name, func(t *testing.T) {
			_, err := decodeEmbedding(meta)
			require.Error(t, err)
		})
	}
}
