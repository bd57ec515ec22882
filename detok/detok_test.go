package detok

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/require"
)

// repoRoot is the module root (the parent of this package's directory).
func repoRoot(t testing.TB) string {
	t.Helper()
	wd, err := os.Getwd()
	require.NoError(t, err)
	return filepath.Dir(wd)
}

const defaultModel = "models/SmolLM2-135M-Instruct"

// defaultModelDir returns the default model's directory or skips.
func defaultModelDir(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(repoRoot(t), defaultModel)
	if _, err := os.Stat(filepath.Join(dir, "tokenizer.json")); err != nil {
		t.Skipf("default model tokenizer missing (%v)", err)
	}
	return dir
}

type refCase struct {
	Name   string   `json:"name"`
	Prompt []int32  `json:"prompt"`
	Output []int32  `json:"output"`
	Skip   bool     `json:"skip"`
	Spaces bool     `json:"spaces"`
	Decode string   `json:"decode"`
	Pieces []string `json:"pieces"`
}

type refFile struct {
	Cases     []refCase `json:"cases"`
	TokenText []string  `json:"token_text"`
	Logprob   []struct {
		ID      int32   `json:"id"`
		Context []int32 `json:"context"`
		Text    string  `json:"text"`
	} `json:"logprob"`
}

// references runs testdata/make_reference.py (it imports vLLM, ~10 s)
// into a temporary directory and returns it, or skips without the venv.
func references(t *testing.T, model string) string {
	t.Helper()
	py := filepath.Join(repoRoot(t), ".venv", "bin", "python")
	if _, err := os.Stat(py); err != nil {
		t.Skipf("no venv python at %s: %v", py, err)
	}
	dir := t.TempDir()
	cmd := exec.Command(py, filepath.Join("testdata", "make_reference.py"), dir, model)
	cmd.Env = append(os.Environ(), "TOKENIZERS_PARALLELISM=false", "VLLM_LOGGING_LEVEL=ERROR")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "make_reference.py:\n%s", out)
	return dir
}

func loadRef(t *testing.T, refs, name string) refFile {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(refs, name+".json"))
	require.NoError(t, err)
	var r refFile
	require.NoError(t, json.Unmarshal(b, &r))
	return r
}

func TestDifferential(t *testing.T) {
	model := defaultModelDir(t)
	refs := references(t, model)
	for _, name := range []string{"default", "spm_llama", "spm_gemma", "spm_metaspace"} {
		t.Run(name, func(t *testing.T) {
			ref := loadRef(t, refs, name)
			dir := filepath.Join(refs, name)
			if name == "default" {
				dir = model
			}
			tok, err := Load(dir)
			require.NoError(t, err)
			require.GreaterOrEqual(t, len(ref.Cases), 200)

			for _, c := range ref.Cases {
				opts := Options{SkipSpecialTokens: c.Skip, SpacesBetweenSpecialTokens: c.Spaces}
				require.Equal(t, c.Decode, tok.Decode(c.Output, opts), "Decode %s", c.Name)

				st := tok.NewStream(opts, c.Prompt)
				for i, id := range c.Output {
					got := st.Step(id)
					require.Equal(t, c.Pieces[i], got, "Step %s token %d (id %d)", c.Name, i, id)
					require.True(t, utf8.ValidString(got))
				}
				// Multi-id steps concatenate the same way.
				st = tok.NewStream(opts, c.Prompt)
				var got strings.Builder
				for i := 0; i < len(c.Output); i += 3 {
					got.WriteString(st.Step(c.Output[i:min(i+3, len(c.Output))]...))
				}
				require.Equal(t, strings.Join(c.Pieces, ""), got.String(), "batched Step %s", c.Name)
			}
			t.Logf("%s: %d decode+stream cases, %d token texts, %d logprob texts",
				name, len(ref.Cases), len(ref.TokenText), len(ref.Logprob))

			require.Equal(t, len(ref.TokenText), tok.VocabSize())
			for id, want := range ref.TokenText {
				require.Equal(t, want, tok.TokenText(int32(id)), "TokenText(%d)", id)
			}
			for _, lp := range ref.Logprob {
				require.Equal(t, lp.Text, tok.LogprobText(lp.ID, lp.Context), "LogprobText(%d, %v)", lp.ID, lp.Context)
			}
		})
	}
}

// TestRandomRobustness feeds seeded random ids (including unknown and
// negative ones) and checks invariants that hold without a reference: no
// panic, valid UTF-8 output, and byte-level streams concatenating to a
// prefix-consistent text.
func TestRandomRobustness(t *testing.T) {
	tok, err := Load(defaultModelDir(t))
	require.NoError(t, err)
	r := rand.New(rand.NewPCG(1, 2))
	n := int32(tok.VocabSize())
	for iter := range 300 {
		ids := make([]int32, r.IntN(100))
		for i := range ids {
			ids[i] = r.Int32N(n + 10)
			if r.IntN(50) == 0 {
				ids[i] = -1 - r.Int32N(5)
			}
		}
		opts := Options{SkipSpecialTokens: iter%2 == 0, SpacesBetweenSpecialTokens: iter%3 == 0}
		st := tok.NewStream(opts, nil)
		var all strings.Builder
		for _, id := range ids {
			s := st.Step(id)
			require.True(t, utf8.ValidString(s))
			all.WriteString(s)
		}
		valid := ids[:0:0]
		for _, id := range ids {
			if id >= 0 {
				valid = append(valid, id)
			}
		}
		full := tok.Decode(valid, opts)
		require.True(t, utf8.ValidString(full))
		if opts.SpacesBetweenSpecialTokens || opts.SkipSpecialTokens {
			// Byte-level text is streamed exactly, up to a held-back tail.
			require.True(t, strings.HasPrefix(full, all.String()), "iter %d: %q vs %q", iter, all.String(), full)
		}
	}
}

func TestDecodersUnit(t *testing.T) {
	mk := func(decoder string, vocab map[string]int) *Tokenizer {
		t.Helper()
		v, err := json.Marshal(vocab)
		require.NoError(t, err)
		js := fmt.Sprintf(`{"added_tokens":[{"id":100,"content":"<s>","special":true},{"id":101,"content":"<x>","special":false}],
			"decoder":%s,"pre_tokenizer":{"type":"Metaspace","replacement":"▁"},"model":{"type":"BPE","vocab":%s}}`, decoder, v)
		tok, err := Parse([]byte(js), nil)
		require.NoError(t, err)
		return tok
	}
	vocab := map[string]int{"▁a": 0, "▁▁b": 1, "<0xE4>": 2, "<0xBD>": 3, "<0xA0>": 4, "c": 5, "ĠhiĊ": 6, "é": 7}
	llama := `{"type":"Sequence","decoders":[{"type":"Replace","pattern":{"String":"▁"},"content":" "},{"type":"ByteFallback"},{"type":"Fuse"},{"type":"Strip","content":" ","start":1,"stop":0}]}`
	tests := []struct {
		name, decoder string
		ids           []int32
		skip          bool
		want          string
	}{
		{"llama strip first space", llama, []int32{0, 1}, false, "a  b"},
		{"llama byte fallback", llama, []int32{0, 2, 3, 4, 5}, false, "a你c"},
		{"llama partial bytes are one FFFD each", llama, []int32{2, 3, 5}, false, "\uFFFD\uFFFDc"},
		{"llama special kept", llama, []int32{100, 0}, false, "<s> a"},
		{"llama special skipped", llama, []int32{100, 0}, true, "a"},
		{"non-special added kept", llama, []int32{101, 0}, true, "<x> a"},
		{"unknown ids dropped", llama, []int32{500, 0, 99}, false, "a"},
		{"metaspace first token loses all markers", `{"type":"Metaspace","replacement":"▁","prepend_scheme":"always"}`, []int32{1, 0}, false, "b a"},
		{"metaspace never", `{"type":"Metaspace","replacement":"▁","prepend_scheme":"never"}`, []int32{1, 0}, false, "  b a"},
		{"bytelevel", `{"type":"ByteLevel"}`, []int32{6, 6}, false, " hi\n hi\n"},
		{"bytelevel lone byte", `{"type":"ByteLevel"}`, []int32{7, 5}, false, "\uFFFDc"},
		{"bytelevel non-table char raw", `{"type":"ByteLevel"}`, []int32{0}, false, "▁a"},
		{"no decoder joins with spaces", `null`, []int32{5, 5}, false, "c c"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tok := mk(tc.decoder, vocab)
			require.Equal(t, tc.want, tok.Decode(tc.ids, Options{SkipSpecialTokens: tc.skip}))
		})
	}
}

func TestUnsupportedDecoder(t *testing.T) {
	for _, tc := range []struct{ decoder, want string }{
		{`{"type":"WordPiece","prefix":"##"}`, `unsupported decoder "WordPiece"`},
		{`{"type":"Sequence","decoders":[{"type":"Fuse"},{"type":"CTC"}]}`, `Sequence[1]: unsupported decoder "CTC"`},
		{`{"type":"Replace","pattern":{"Regex":"x+"},"content":" "}`, `only String patterns`},
	} {
		_, err := Parse([]byte(`{"model":{"type":"BPE","vocab":{}},"decoder":`+tc.decoder+`}`), nil)
		require.ErrorContains(t, err, tc.want)
	}
	_, err := Load(filepath.Join(t.TempDir(), "missing"))
	require.ErrorContains(t, err, "detok: load tokenizer")
}

func TestLossyMatchesMaximalSubparts(t *testing.T) {
	for _, tc := range []struct {
		in   []byte
		want string
	}{
		{[]byte{0xE4, 0xBD}, "\uFFFD"},
		{[]byte{0xE4, 0xBD, 'a'}, "\uFFFDa"},
		{[]byte{0xF0, 0x9F, 0x8E}, "\uFFFD"},
		{[]byte{0x80, 0x80}, "\uFFFD\uFFFD"},
		{[]byte{0xED, 0xA0, 0x80}, "\uFFFD\uFFFD\uFFFD"},
		{[]byte{0xE0, 0x80}, "\uFFFD\uFFFD"},
		{[]byte{0xF4, 0x90}, "\uFFFD\uFFFD"},
		{[]byte{0xC3, 0xA9, 0xC3}, "é\uFFFD"},
	} {
		require.Equal(t, tc.want, lossyString(tc.in), "% x", tc.in)
	}
}

// benchOutput is the default model's tokenizer with a seeded 1000-id output, whose first 32
// ids serve as the prompt (the step benchmarks' fixture).
func benchOutput(b *testing.B) (tok *Tokenizer, ids, prompt []int32) {
	tok, err := Load(defaultModelDir(b))
	require.NoError(b, err)
	r := rand.New(rand.NewPCG(7, 8))
	ids = make([]int32, 1000)
	for i := range ids {
		ids[i] = 17 + r.Int32N(int32(tok.VocabSize())-17)
	}
	return tok, ids, ids[:32]
}

// BenchmarkStreamStep measures Stream.Step, one token at a time, over
// 1000-token outputs of the default model.
func BenchmarkStreamStep(b *testing.B) {
	tok, ids, prompt := benchOutput(b)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		st := tok.NewStream(DefaultOptions(), prompt)
		for _, id := range ids {
			st.Step(id)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(ids)), "ns/token")
}
