package vllm_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/test/internal/govtest"
)

// Go detokenizes what vLLM's engine generates and matches stop strings itself. This test checks
// the text govllm serves against vLLM's own detokenizer (test/vllm/detok_reference.py runs
// vLLM's FastIncrementalDetokenizer, which AsyncLLM's output processor uses) for the same greedy
// token ids, on 200 prompts whose answers hold code, emoji, CJK, combining marks, whitespace runs
// and (with skip_special_tokens=false) special tokens; streamed and not; and with stop strings
// taken across streamed chunk boundaries, so that they straddle tokens. The prompt token ids the
// server reports (Go's encoder, package tokenize) must be Hugging Face's.

var detokSeeds = []string{
	"def add(a, b):\n    return a + b", "for (int i = 0; i < n; i++) { sum += a[i]; }",
	"SELECT name, COUNT(*) FROM users GROUP BY name;", "fn main() { println!(\"hi\"); }",
	"console.log(`${x} + ${y}`);", "#include <stdio.h>\nint main(void) { return 0; }",
	"I love pizza 🍕 and tacos 🌮!", "Family: 👨‍👩‍👧‍👦, thumbs up 👍🏽, flags 🇫🇷🇯🇵",
	"🎉🎉🎉 Party time 🥳", "Weather: ☀️ then 🌧️ then ⛈️",
	"东京是日本的首都。", "我喜欢学习中文和日语。", "こんにちは、世界！元気ですか？", "안녕하세요, 만나서 반갑습니다.",
	"Ελληνικά και русский текст вместе", "مرحبا بالعالم", "नमस्ते दुनिया",
	"e\u0301cole, cafe\u0301, n\u0303, a\u0308", "Zalgo: Z\u0351\u0354a\u0306l\u0337g\u0315o\u0301",
	"Ünïcödé wörds ünd mörë", "naïve façade coöperate résumé",
	"a    b\t\t\tc\n\n\n\nd", "   leading spaces and trailing   ", "line1\r\nline2\r\n\r\nline4",
	"tabs\there\tand\there", "indent:\n        deep\n    less\nnone",
	"<|im_start|>user\nhi<|im_end|>", "Use <|endoftext|> to end.", "The tag <|im_end|> appears here.",
	"Math: ∑ x² ≤ ∞, ∀ε>0 ∃δ", "Currency: €100, £50, ¥1000, ₹20", "Arrows → ← ↑ ↓ ⇒ ⟹",
	"JSON: {\"key\": [1, 2, {\"nested\": null}]}", "URL https://example.com/a?b=c&d=e#f",
	"Quotes: “smart” ‘single’ «guillemets»", "Dashes – — and ellipsis…",
	"Numbers 3.14159 2.71828 1.41421", "CamelCaseIdentifiersAndsnake_case_ones",
	"The quick brown fox jumps over the lazy dog.", "Once upon a time in a land far away",
}

var detokTemplates = []string{
	"Repeat exactly: %s\n", "Continue this text: %s", "Translate to French: %s\n", "%s", "Explain what this means: %s\nAnswer:",
}

type detokChoice struct {
	Text         string  `json:"text"`
	TokenIDs     []int32 `json:"token_ids"`
	FinishReason *string `json:"finish_reason"`
	PromptIDs    []int32 `json:"prompt_token_ids"`
}

type detokResult struct {
	text   string
	ids    []int32
	finish string
	chunks []string // streamed: the text of each content chunk
	usage  int
	prompt []int32 // prompt_token_ids: how govllm tokenized the prompt (Go's encoder)
}

func completeDetok(t *testing.T, body map[string]any) detokResult {
	t.Helper()
	b, err := json.Marshal(body)
	require.NoError(t, err)
	resp, err := http.Post(srv.URL+"/v1/completions", "application/json", bytes.NewReader(b))
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	var r detokResult
	if body["stream"] != true {
		var c struct {
			Choices []detokChoice `json:"choices"`
			Usage   struct {
				CompletionTokens int `json:"completion_tokens"`
			} `json:"usage"`
		}
		require.NoError(t, json.NewDecoder(resp.Body).Decode(&c))
		r.text, r.ids, r.usage = c.Choices[0].Text, c.Choices[0].TokenIDs, c.Usage.CompletionTokens
		r.prompt = c.Choices[0].PromptIDs
		r.finish = *c.Choices[0].FinishReason
		return r
	}
	for _, data := range govtest.SSEData(t, resp.Body) {
		if data == "[DONE]" {
			continue
		}
		var c struct {
			Choices []detokChoice `json:"choices"`
			Usage   *struct {
				CompletionTokens int `json:"completion_tokens"`
			} `json:"usage"`
		}
		require.NoError(t, json.Unmarshal([]byte(data), &c), data)
		if c.Usage != nil {
			r.usage = c.Usage.CompletionTokens
		}
		for _, ch := range c.Choices {
			r.text += ch.Text
			r.ids = append(r.ids, ch.TokenIDs...)
			if ch.PromptIDs != nil {
				r.prompt = ch.PromptIDs
			}
			if ch.Text != "" {
				r.chunks = append(r.chunks, ch.Text)
			}
			if ch.FinishReason != nil {
				r.finish = *ch.FinishReason
			}
		}
	}
	return r
}

// detokCase is one request and what vLLM's detokenizer must make of its ids.
type detokCase struct {
	Prompt    string   `json:"prompt"`
	IDs       []int32  `json:"ids"`
	Stop      []string `json:"stop,omitempty"`
	Include   bool     `json:"include"`
	MinTokens int      `json:"min_tokens"`
	Skip      bool     `json:"skip"`
	Spaces    bool     `json:"spaces"`
	EOS       bool     `json:"eos"`

	got   detokResult
	label string
}

// straddlingStop returns up to 2 runes each side of the boundary between two streamed chunks
// in the middle of the output, or "" when there are too few.
func straddlingStop(chunks []string) string {
	if len(chunks) < 4 {
		return ""
	}
	k := len(chunks) / 2
	left, right := []rune(chunks[k-1]), []rune(chunks[k])
	l, r := min(2, len(left)), min(2, len(right))
	return string(left[len(left)-l:]) + string(right[:r])
}

func TestDetokenizedTextMatchesVLLM(t *testing.T) {
	const maxTokens = 24
	eos := int32(2) // SmolLM2's <|im_end|>; checked against the tokenizer by the reference below
	var prompts []string
	for _, tpl := range detokTemplates {
		for _, seed := range detokSeeds {
			prompts = append(prompts, fmt.Sprintf(tpl, seed))
		}
	}
	require.GreaterOrEqual(t, len(prompts), 200)
	// Short answers that end with EOS, whose text (skip_special_tokens=false,
	// include_stop_str_in_output) then ends with <|im_end|>.
	shortFrom := len(prompts)
	for _, q := range []string{"What is 2+2?", "Say yes.", "Name a color.", "What is the capital of Italy?",
		"Is the sky blue?", "Say hello in French.", "How many legs does a cat have?", "Spell 'cat'."} {
		prompts = append(prompts, "<|im_start|>user\n"+q+"<|im_end|>\n<|im_start|>assistant\n")
	}

	cases := make([][]detokCase, len(prompts))
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i, p := range prompts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			// skip_special_tokens=false with include_stop_str_in_output keeps the EOS token's text.
			skip, spaces, keepEOS := i%4 != 3, i%8 != 7, i%8 == 3
			if i >= shortFrom {
				skip, spaces, keepEOS = false, i%2 == 0, true
			}
			base := map[string]any{"prompt": p, "temperature": 0, "max_tokens": maxTokens, "return_token_ids": true,
				"skip_special_tokens": skip, "spaces_between_special_tokens": spaces, "include_stop_str_in_output": keepEOS}
			with := func(extra map[string]any) map[string]any {
				m := map[string]any{}
				for k, v := range base {
					m[k] = v
				}
				for k, v := range extra {
					m[k] = v
				}
				return m
			}
			plain := completeDetok(t, base)
			streamed := completeDetok(t, with(map[string]any{"stream": true, "stream_options": map[string]any{"include_usage": true}}))
			mk := func(label string, r detokResult, stop []string, include bool, minTokens int) detokCase {
				return detokCase{Prompt: p, IDs: r.ids, Stop: stop, Include: include, MinTokens: minTokens, Skip: skip,
					Spaces: spaces, EOS: r.finish == "stop" && len(r.ids) > 0 && r.ids[len(r.ids)-1] == eos,
					got: r, label: fmt.Sprintf("prompt %d %q (%s)", i, p, label)}
			}
			cs := []detokCase{mk("plain", plain, nil, keepEOS, 0), mk("streamed", streamed, nil, keepEOS, 0)}
			if stop := straddlingStop(streamed.chunks); stop != "" {
				include, minTokens := i%2 == 1, 0
				if i%5 == 0 {
					minTokens = 3
				}
				extra := map[string]any{"stop": []string{stop}, "include_stop_str_in_output": include, "min_tokens": minTokens}
				stopped := completeDetok(t, with(extra))
				extra["stream"] = true
				extra["stream_options"] = map[string]any{"include_usage": true}
				stoppedStream := completeDetok(t, with(extra))
				cs = append(cs, mk("stop", stopped, []string{stop}, include, minTokens),
					mk("stop streamed", stoppedStream, []string{stop}, include, minTokens))
			}
			cases[i] = cs
		}()
	}
	wg.Wait()

	var flat []detokCase
	for _, cs := range cases {
		flat = append(flat, cs...)
	}
	in, err := json.Marshal(map[string]any{"model": govtest.Model("SmolLM2-135M-Instruct"), "cases": flat})
	require.NoError(t, err)
	cmd := exec.Command(govtest.VenvPython(), "detok_reference.py")
	cmd.Stdin = bytes.NewReader(in)
	cmd.Env = os.Environ()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	require.NoError(t, err, stderr.String())
	lines := bytes.Split(bytes.TrimSpace(out), []byte("\n"))
	var refs []struct {
		Text      string  `json:"text"`
		NumTokens int     `json:"num_tokens"`
		Stop      *string `json:"stop"`
		PromptIDs []int32 `json:"prompt_ids"`
	}
	require.NoError(t, json.Unmarshal(lines[len(lines)-1], &refs))
	require.Len(t, refs, len(flat))

	stops, matched, multibyte, special := 0, 0, 0, 0
	for i, c := range flat {
		ref := refs[i]
		require.Equal(t, ref.PromptIDs, c.got.prompt, "%s: prompt tokens (Go's encoder against Hugging Face's)", c.label)
		require.Equal(t, ref.Text, c.got.text, c.label)
		require.Equal(t, ref.NumTokens, len(c.got.ids), "%s: tokens kept", c.label)
		require.Equal(t, ref.NumTokens, c.got.usage, "%s: usage", c.label)
		if len(c.Stop) > 0 {
			stops++
			if ref.Stop != nil {
				matched++
				require.Equal(t, "stop", c.got.finish, c.label)
			}
		}
		if utf8.RuneCountInString(c.got.text) != len(c.got.text) {
			multibyte++
		}
		if !c.Skip && strings.Contains(c.got.text, "<|") {
			special++
		}
	}
	// Streamed and not: the same text wherever the engine gave the same ids.
	same := 0
	for _, cs := range cases {
		if len(cs) >= 2 && equalIDs(cs[0].got.ids, cs[1].got.ids) {
			same++
			require.Equal(t, cs[0].got.text, cs[1].got.text, cs[0].label)
		}
	}
	t.Logf("%d requests checked against vLLM's detokenizer: %d with a stop string (%d matched), %d with multi-byte text, "+
		"%d with special tokens in the text; streamed = non-streamed ids for %d of %d prompts",
		len(flat), stops, matched, multibyte, special, same, len(cases))
	require.Greater(t, matched, len(cases)/4, "too few stop strings matched to test them")
	require.Positive(t, special, "no special token in any text")
	require.Greater(t, same, len(cases)*3/4)
}

func equalIDs(a, b []int32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
