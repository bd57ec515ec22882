package detok

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/require"
)

// outputCase is one case of testdata/output_reference.json, written by
// testdata/make_output_reference.py from vLLM's own detokenizer.
type outputCase struct {
	Name           string    `json:"name"`
	Tokenizer      string    `json:"tokenizer"`
	Prompt         []int32   `json:"prompt"`
	Steps          [][]int32 `json:"steps"`
	Stop           []string  `json:"stop"`
	Include        bool      `json:"include"`
	MinTokens      int       `json:"min_tokens"`
	Skip           bool      `json:"skip"`
	Spaces         bool      `json:"spaces"`
	StopTerminated bool      `json:"stop_terminated"`
	Finish         bool      `json:"finish"`
	Deltas         []string  `json:"deltas"`
	NumTokens      []int     `json:"num_tokens"`
	Matched        *string   `json:"matched"`
	TokenIDs       []int32   `json:"token_ids"`
	Text           string    `json:"text"`
}

func TestOutputDifferential(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("testdata", "output_reference.json"))
	require.NoError(t, err)
	var ref struct {
		Cases []outputCase `json:"cases"`
	}
	require.NoError(t, json.Unmarshal(b, &ref))
	require.GreaterOrEqual(t, len(ref.Cases), 200)

	byTok := map[string][]outputCase{}
	for _, c := range ref.Cases {
		byTok[c.Tokenizer] = append(byTok[c.Tokenizer], c)
	}
	require.Len(t, byTok, 4)
	for name, cases := range byTok {
		t.Run(name, func(t *testing.T) {
			var dir string
			if name == "default" {
				dir = defaultModelDir(t)
			} else {
				dir = filepath.Join("testdata", "spm", name)
			}
			tok, err := Load(dir)
			require.NoError(t, err)
			for _, c := range cases {
				checkOutputCase(t, tok, c)
			}
			t.Logf("%d cases", len(cases))
		})
	}
}

func checkOutputCase(t *testing.T, tok *Tokenizer, c outputCase) {
	t.Helper()
	o := tok.NewOutput(OutputOptions{
		Options:     Options{SkipSpecialTokens: c.Skip, SpacesBetweenSpecialTokens: c.Spaces},
		Stop:        c.Stop,
		IncludeStop: c.Include,
		MinTokens:   c.MinTokens,
	}, c.Prompt)
	var streamed strings.Builder
	var stop string
	var matched bool
	for i, step := range c.Steps {
		last := i == len(c.Steps)-1
		if matched {
			// The engine would have finished; further steps are no-ops.
			s, m := o.Update(step, c.StopTerminated && last)
			require.False(t, m, "%s: step %d after the match", c.Name, i)
			require.Empty(t, s)
			require.Empty(t, o.Next(true), "%s: Next after the match", c.Name)
			continue
		}
		stop, matched = o.Update(step, c.StopTerminated && last)
		delta := o.Next(matched || (last && c.Finish))
		require.Equal(t, c.Deltas[i], delta, "%s: delta of step %d %v", c.Name, i, step)
		require.True(t, utf8.ValidString(delta))
		require.Equal(t, c.NumTokens[i], o.NumTokens(), "%s: NumTokens after step %d", c.Name, i)
		streamed.WriteString(delta)
	}
	require.Len(t, c.Deltas, len(c.NumTokens))
	if c.Matched != nil {
		require.True(t, matched, "%s: want stop %q", c.Name, *c.Matched)
		require.Equal(t, *c.Matched, stop, c.Name)
	} else {
		require.False(t, matched, "%s: unexpected stop %q", c.Name, stop)
	}
	require.Equal(t, c.Text, o.Text(), c.Name)
	require.Equal(t, c.TokenIDs, o.TokenIDs(), c.Name)
	if c.Finish || matched {
		require.Equal(t, c.Text, streamed.String(), "%s: deltas concatenate to Text", c.Name)
	}
}

// unitTokenizer is a ByteFallback tokenizer with one token per character
// of "abcdefghijklmnopqrstuvwxyz .。", the 256 <0xXX> byte tokens, and a
// special <eos>; enc encodes a string with it (other characters as their
// UTF-8 bytes, one token each).
func unitTokenizer(t *testing.T) (*Tokenizer, func(string) []int32) {
	t.Helper()
	vocab := map[string]int{}
	for _, r := range "abcdefghijklmnopqrstuvwxyz .。" {
		vocab[string(r)] = len(vocab)
	}
	for b := range 256 {
		vocab[fmt.Sprintf("<0x%02X>", b)] = len(vocab)
	}
	v, err := json.Marshal(vocab)
	require.NoError(t, err)
	js := fmt.Sprintf(`{"added_tokens":[{"id":%d,"content":"<eos>","special":true}],
		"decoder":{"type":"Sequence","decoders":[{"type":"ByteFallback"},{"type":"Fuse"}]},
		"model":{"type":"BPE","vocab":%s}}`, len(vocab), v)
	tok, err := Parse([]byte(js), nil)
	require.NoError(t, err)
	enc := func(s string) []int32 {
		var out []int32
		for i := 0; i < len(s); {
			r, size := utf8.DecodeRuneInString(s[i:])
			if id, ok := vocab[string(r)]; ok && r != utf8.RuneError {
				out = append(out, int32(id))
			} else {
				for _, b := range []byte(s[i : i+size]) {
					out = append(out, int32(vocab[fmt.Sprintf("<0x%02X>", b)]))
				}
			}
			i += size
		}
		return out
	}
	return tok, enc
}

func TestOutputUnit(t *testing.T) {
	tok, enc := unitTokenizer(t)
	eos := int32(tok.VocabSize() - 1)
	type step struct {
		text      string // encoded with enc; "" with eos means just EOS
		eos       bool   // append the EOS id and mark the step stop-terminated
		finished  bool
		wantDelta string
		wantStop  string
	}
	tests := []struct {
		name      string
		opts      OutputOptions
		steps     []step
		wantText  string
		wantCount int
	}{
		{
			name: "stop at the very first token",
			opts: OutputOptions{Stop: []string{"a"}},
			steps: []step{
				{text: "abc", wantStop: "a", finished: true},
			},
			wantText: "", wantCount: 1,
		},
		{
			name: "stop at the very first token, included",
			opts: OutputOptions{Stop: []string{"a"}, IncludeStop: true},
			steps: []step{
				{text: "abc", wantStop: "a", finished: true, wantDelta: "a"},
			},
			wantText: "a", wantCount: 1,
		},
		{
			name: "hold-back counts code points of multi-byte text",
			opts: OutputOptions{Stop: []string{"。x", "zzz"}}, // hold back 2 characters
			steps: []step{
				{text: "a。", wantDelta: ""},
				{text: "é", wantDelta: "a"},
				{text: "🙂", wantDelta: "。"},
				{text: "b", wantDelta: "é"},
				{text: "", finished: true, wantDelta: "🙂b"},
			},
			wantText: "a。é🙂b", wantCount: 9, // é is 2 byte tokens, 🙂 is 4
		},
		{
			name: "incomplete character is neither emitted nor counted by the hold-back",
			opts: OutputOptions{Stop: []string{"zz"}},
			steps: []step{
				{text: "ab", wantDelta: "a"},
				{text: "🙂"[:2], wantDelta: ""}, // no byte of 🙂 is shown yet
				{text: "🙂"[2:], wantDelta: "b"},
				{text: "", finished: true, wantDelta: "🙂"},
			},
			wantText: "ab🙂", wantCount: 6,
		},
		{
			name: "multi-byte stop string completed by its last byte token",
			opts: OutputOptions{Stop: []string{"🙂"}},
			steps: []step{
				{text: "ab🙂"[:4], wantDelta: "ab"},
				{text: "🙂"[2:] + "cd", wantStop: "🙂", finished: true},
			},
			wantText: "ab", wantCount: 6, // c and d dropped
		},
		{
			name: "MinTokens larger than the output: no stop is ever checked",
			opts: OutputOptions{Stop: []string{"b"}, MinTokens: 10},
			steps: []step{
				{text: "ab", wantDelta: "ab"},
				{text: "cb", eos: true, finished: true, wantDelta: "cb"},
			},
			wantText: "abcb", wantCount: 5,
		},
		{
			name: "MinTokens: a stop may begin before the boundary but must end after it",
			opts: OutputOptions{Stop: []string{"bc", "a"}, MinTokens: 2},
			steps: []step{
				{text: "abcd", wantStop: "bc", finished: true, wantDelta: "a"},
			},
			wantText: "a", wantCount: 3,
		},
		{
			name: "the later-listed stop that completes first wins",
			opts: OutputOptions{Stop: []string{"cd", "b"}},
			steps: []step{
				{text: "abcd", wantStop: "b", finished: true, wantDelta: "a"},
			},
			wantText: "a", wantCount: 2,
		},
		{
			name: "equal ends go to the first listed",
			opts: OutputOptions{Stop: []string{"c", "bc"}},
			steps: []step{
				{text: "abcd", wantStop: "c", finished: true, wantDelta: "ab"},
			},
			wantText: "ab", wantCount: 3,
		},
		{
			name: "MinTokens: a stop inside the first tokens is never matched, a later one is",
			opts: OutputOptions{Stop: []string{"b"}, MinTokens: 3},
			steps: []step{
				{text: "ab", wantDelta: "ab"},
				{text: "c", wantDelta: "c"},
				{text: "dbe", wantStop: "b", finished: true, wantDelta: "d"},
			},
			wantText: "abcd", wantCount: 5,
		},
		{
			name: "stop-terminated id is counted, not shown, and dropped after an earlier stop string",
			opts: OutputOptions{Options: Options{}, Stop: []string{"b"}},
			steps: []step{
				{text: "ab", eos: true, wantStop: "b", finished: true, wantDelta: "a"},
			},
			wantText: "a", wantCount: 2,
		},
		{
			name: "stop-terminated id is detokenized with IncludeStop",
			opts: OutputOptions{Options: Options{}, IncludeStop: true},
			steps: []step{
				{text: "ab", eos: true, finished: true, wantDelta: "ab<eos>"},
			},
			wantText: "ab<eos>", wantCount: 3,
		},
		{
			name: "empty stop strings are ignored",
			opts: OutputOptions{Stop: []string{""}},
			steps: []step{
				{text: "ab", wantDelta: "ab"},
			},
			wantText: "ab", wantCount: 2,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := tok.NewOutput(tc.opts, enc("x"))
			var all strings.Builder
			for i, s := range tc.steps {
				ids := enc(s.text)
				if s.eos {
					ids = append(ids, eos)
				}
				stop, matched := o.Update(ids, s.eos)
				require.Equal(t, s.wantStop, stop, "step %d", i)
				require.Equal(t, s.wantStop != "", matched, "step %d", i)
				d := o.Next(s.finished)
				require.Equal(t, s.wantDelta, d, "step %d", i)
				all.WriteString(d)
			}
			require.Equal(t, tc.wantText, o.Text())
			require.Equal(t, tc.wantText, all.String())
			require.Equal(t, tc.wantCount, o.NumTokens())
			require.Len(t, o.TokenIDs(), tc.wantCount)
		})
	}
}

func TestOutputUpdateAfterMatchIsNoop(t *testing.T) {
	tok, enc := unitTokenizer(t)
	o := tok.NewOutput(OutputOptions{Options: DefaultOptions(), Stop: []string{"c"}}, nil)
	stop, matched := o.Update(enc("abcd"), false)
	require.True(t, matched)
	require.Equal(t, "c", stop)
	ids := append([]int32(nil), o.TokenIDs()...)
	require.Equal(t, enc("abc"), ids)

	stop, matched = o.Update(enc("xyc"), true)
	require.False(t, matched)
	require.Empty(t, stop)
	require.Equal(t, ids, o.TokenIDs())
	require.Equal(t, 3, o.NumTokens())
	require.Equal(t, "ab", o.Text())
	require.Equal(t, "ab", o.Next(true))
	require.Empty(t, o.Next(true))

	o = tok.NewOutput(OutputOptions{}, nil)
	stop, matched = o.Update(nil, true)
	require.False(t, matched)
	require.Empty(t, stop)
	require.Zero(t, o.NumTokens())
}

// TestOutputRandomSteps checks, on random ids and step sizes, that feeding
// a step at a time agrees with feeding one id at a time (the property
// vLLM's earliest-completing stop rule is designed for).
func TestOutputRandomSteps(t *testing.T) {
	tok, err := Load(filepath.Join("testdata", "spm", "spm_llama"))
	require.NoError(t, err)
	r := rand.New(rand.NewPCG(3, 4))
	stops := []string{"e", "th", "o w", "\uFFFD", "🎉", "lazy", "x"}
	for iter := range 200 {
		ids := make([]int32, 1+r.IntN(40))
		for i := range ids {
			ids[i] = r.Int32N(int32(tok.VocabSize()))
		}
		opts := OutputOptions{
			Options:     Options{SkipSpecialTokens: iter%2 == 0, SpacesBetweenSpecialTokens: iter%3 == 0},
			Stop:        []string{stops[r.IntN(len(stops))], stops[r.IntN(len(stops))]},
			IncludeStop: iter%4 < 2,
			MinTokens:   r.IntN(5),
		}
		one, many := tok.NewOutput(opts, ids[:1]), tok.NewOutput(opts, ids[:1])
		var s1, sN strings.Builder
		var stop1, stopN string
		for _, id := range ids[1:] {
			if s, ok := one.Update([]int32{id}, false); ok {
				stop1 = s
			}
			s1.WriteString(one.Next(false))
		}
		for i := 1; i < len(ids); {
			n := min(1+r.IntN(4), len(ids)-i)
			if s, ok := many.Update(ids[i:i+n], false); ok {
				stopN = s
			}
			sN.WriteString(many.Next(false))
			i += n
		}
		s1.WriteString(one.Next(true))
		sN.WriteString(many.Next(true))
		require.Equal(t, stop1, stopN, "iter %d", iter)
		require.Equal(t, one.Text(), many.Text(), "iter %d", iter)
		require.Equal(t, one.Text(), s1.String(), "iter %d", iter)
		require.Equal(t, many.Text(), sN.String(), "iter %d", iter)
		require.Equal(t, one.TokenIDs(), many.TokenIDs(), "iter %d", iter)
	}
}

// BenchmarkOutputStep measures Output.Update plus Next(false), one token
// per step, over the same 1000-token outputs as BenchmarkStreamStep,
// without and with (never matching) stop strings.
func BenchmarkOutputStep(b *testing.B) {
	tok, ids, prompt := benchOutput(b)
	for _, bc := range []struct {
		name string
		stop []string
	}{
		{"nostop", nil},
		{"stop", []string{"<<STOP>>", "Observation:", "\x00\x01"}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			opts := OutputOptions{Options: DefaultOptions(), Stop: bc.stop}
			step := make([]int32, 1)
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				o := tok.NewOutput(opts, prompt)
				for _, id := range ids {
					step[0] = id
					o.Update(step, false)
					o.Next(false)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(ids)), "ns/token")
		})
	}
}
