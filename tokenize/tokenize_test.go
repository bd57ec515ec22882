package tokenize_test

import (
	"encoding/json"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/detok"
	"github.com/govllm/govllm/tokenize"
)

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(filepath.Dir(file))
}

func defaultEncoder(t testing.TB) *tokenize.Encoder {
	t.Helper()
	dir := filepath.Join(repoRoot(), "models", "SmolLM2-135M-Instruct")
	if _, err := os.Stat(filepath.Join(dir, "tokenizer.json")); err != nil {
		t.Skip("the default model is not installed (make bootstrap)")
	}
	e, err := tokenize.Load(dir)
	require.NoError(t, err)
	return e
}

// TestEncodeMatchesTokenizers compares with Hugging Face tokenizers' ids for the default
// model's tokenizer (testdata/make_reference.py wrote them).
func TestEncodeMatchesTokenizers(t *testing.T) {
	e := defaultEncoder(t)
	b, err := os.ReadFile(filepath.Join("testdata", "reference.json"))
	require.NoError(t, err)
	var ref struct {
		Cases []struct {
			Text       string  `json:"text"`
			IDs        []int32 `json:"ids"`
			SpecialIDs []int32 `json:"special_ids"`
		} `json:"cases"`
	}
	require.NoError(t, json.Unmarshal(b, &ref))
	require.Greater(t, len(ref.Cases), 800)
	for i, c := range ref.Cases {
		want := c.IDs
		if want == nil {
			want = []int32{}
		}
		require.Equal(t, want, e.Encode(c.Text, false), "case %d %q", i, c.Text)
		if c.SpecialIDs == nil {
			c.SpecialIDs = []int32{}
		}
		require.Equal(t, c.SpecialIDs, e.Encode(c.Text, true), "case %d %q with special tokens", i, c.Text)
		// The cache must not change anything: a second encode gives the same ids.
		require.Equal(t, want, e.Encode(c.Text, false), "case %d again", i)
	}
}

// Tokenizers this package does not reproduce are refused, so the caller falls back.
func TestUnsupportedTokenizers(t *testing.T) {
	for _, name := range []string{"spm_llama", "spm_gemma", "spm_metaspace"} {
		_, err := tokenize.Load(filepath.Join(repoRoot(), "detok", "testdata", "spm", name))
		require.True(t, errors.Is(err, tokenize.ErrUnsupported), "%s: %v", name, err)
	}
	_, err := tokenize.Parse([]byte(`{"model":{"type":"WordPiece","vocab":{}}}`))
	require.ErrorIs(t, err, tokenize.ErrUnsupported)
	_, err = tokenize.Parse([]byte(`not json`))
	require.Error(t, err)
	require.False(t, errors.Is(err, tokenize.ErrUnsupported))
}

// The cache must not keep the caller's bytes: the shim hands Encode a string over C memory that
// Python reuses after the call. Texts are encoded from one reused buffer and compared with a
// fresh encoder's ids (a kept key would later match words it no longer spells).
func TestEncodeDoesNotKeepTheCallersBytes(t *testing.T) {
	e, reference := defaultEncoder(t), defaultEncoder(t) // reference only ever sees Go strings
	rng := rand.New(rand.NewPCG(3, 4))
	buf := make([]byte, 4096)
	for round := 0; round < 200; round++ {
		var words []string
		for n := 0; n < 300; n++ {
			w := make([]byte, 1+rng.IntN(3))
			for i := range w {
				w[i] = byte('a' + rng.IntN(26))
			}
			words = append(words, string(w))
		}
		text := strings.Join(words, " ")
		n := copy(buf, text)
		got := e.Encode(unsafe.String(&buf[0], n), false)
		require.Equal(t, reference.Encode(text, false), got, "round %d", round)
	}
}

func BenchmarkEncodeChatPrompt(b *testing.B) {
	e := defaultEncoder(b)
	text := "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n" +
		"<|im_start|>user\nWrite a short poem about the sea, its waves and the wind over them, in the style of " +
		"an old sailor's song, with a chorus.<|im_end|>\n<|im_start|>assistant\n"
	n := len(e.Encode(text, false))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		e.Encode(text, false)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/token")
}

// FuzzEncode: any text encodes without panicking, and to the same ids twice (the second time
// from the cache). Exactness is TestEncodeMatchesTokenizers'.
func FuzzEncode(f *testing.F) {
	e := defaultEncoder(f)
	for _, s := range []string{"", "Hello, world!", "<|im_start|>user\nhi<|im_end|>", "a  b\t\n\u00a0c", "🙂's 123"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		a := e.Encode(s, true)
		require.Equal(t, a, e.Encode(s, true))
	})
}

// BenchmarkEncodeRandomPrompt encodes prompts of random token ids decoded to text (what vLLM's
// benchmark client sends), a new prompt each time, so that most pre-tokens miss the cache.
func BenchmarkEncodeRandomPrompt(b *testing.B) {
	e := defaultEncoder(b)
	tok, err := detok.Load(filepath.Join(repoRoot(), "models", "SmolLM2-135M-Instruct"))
	require.NoError(b, err)
	rng := rand.New(rand.NewPCG(5, 6))
	prompts := make([]string, 4096)
	for i := range prompts {
		ids := make([]int32, 64)
		for j := range ids {
			ids[j] = 100 + rng.Int32N(40000)
		}
		prompts[i] = tok.Decode(ids, detok.DefaultOptions())
	}
	tokens := 0
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		tokens += len(e.Encode(prompts[i%len(prompts)], false))
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N), "ns/prompt")
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(tokens), "ns/token")
}
