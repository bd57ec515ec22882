package server

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"net/http/httptest"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/require"
)

// The hand-encoded content chunk must be byte for byte what encoding/json writes for the same
// chatChunk, for any text (control characters, quotes, U+2028, invalid UTF-8, emoji).
func TestContentChunkMatchesEncodingJSON(t *testing.T) {
	alphabet := []string{"a", "é", "🙂", "\"", "\\", "\n", "\t", "\b", "\f", "\r", "\x00", "\x1f", "\x7f", "<", ">", "&",
		"\u2028", "\u2029", "\xff", "\xe2\x82", "世", " ", "/", "\u00a0", "\ufffd"}
	rng := rand.New(rand.NewPCG(1, 2))
	texts := []string{"", "plain", "\"quoted\"", "\xc3\x28"}
	for i := 0; i < 2000; i++ {
		var b bytes.Buffer
		for n := rng.IntN(12); n > 0; n-- {
			b.WriteString(alphabet[rng.IntN(len(alphabet))])
		}
		texts = append(texts, b.String())
	}
	for i, text := range texts {
		c := &call{id: "chatcmpl-\"x\u2028", created: 1700000000 + int64(i), model: "m/é\"", params: callParams{n: 3}}
		fast := newSSEWriter(httptest.NewRecorder())
		fast.appendContentChunk(c, i%3, text)
		slow := newSSEWriter(httptest.NewRecorder())
		content := text
		slow.writeSSE(&chatChunk{ID: c.id, Object: "chat.completion.chunk", Created: c.created, Model: c.model,
			Choices: []chunkChoice{{Index: i % 3, Delta: chunkDelta{Content: &content}}}})
		require.Equal(t, slow.buf.String(), fast.buf.String(), "text %q (valid UTF-8: %v)", text, utf8.ValidString(text))
	}
	var v map[string]any
	require.NoError(t, json.Unmarshal(bytes.TrimSuffix(bytes.TrimPrefix([]byte(mustChunk(t)), sseData), []byte("\n\n")), &v))
}

func mustChunk(t *testing.T) string {
	s := newSSEWriter(httptest.NewRecorder())
	s.appendContentChunk(&call{id: "i", model: "m"}, 0, "hi\n")
	return s.buf.String()
}
