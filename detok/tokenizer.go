// Package detok turns token ids back into text in pure Go, matching the
// Hugging Face tokenizers library (as used by transformers' fast tokenizers
// and by vLLM v1) byte for byte.
//
// A [Tokenizer] is loaded from a tokenizer.json (plus an optional
// tokenizer_config.json). It reads the model vocabulary (BPE, WordPiece,
// WordLevel: token→id maps; Unigram: piece lists), the added_tokens with
// their special flags, and the decoder pipeline.
//
// Supported decoders: ByteLevel (GPT-2, Llama-3, Qwen, SmolLM), Metaspace,
// ByteFallback, Fuse, Strip, Replace with a literal String pattern, and
// Sequence of these (the SentencePiece family: Llama-2, Mistral, Gemma use
// Sequence[Replace("▁"," "), ByteFallback, Fuse, Strip(" ",1,0)]), plus no
// decoder at all (tokens joined by spaces, as tokenizers does). Anything
// else (WordPiece, BPEDecoder, CTC, Replace with a Regex pattern) is
// rejected at load time with an error naming it.
//
// Four entry points mirror what vLLM produces:
//
//   - [Tokenizer.Decode] equals transformers' tokenizer.decode(ids,
//     skip_special_tokens=...). transformers 5's fast tokenizer ignores
//     spaces_between_special_tokens entirely (the Rust decode never inserts
//     spaces around added tokens), so Decode ignores it too. When
//     tokenizer_config.json sets clean_up_tokenization_spaces and the model
//     is not BPE, transformers' clean-up replacements are applied.
//   - [Stream] reproduces vLLM v1's FastIncrementalDetokenizer: tokenizers'
//     DecodeStream primed with the prompt ids, including its hold-back of
//     incomplete UTF-8 (nothing is emitted while the decoded window ends in
//     U+FFFD), its invalid-prefix reset, and vLLM's handling of
//     spaces_between_special_tokens=false (consecutive added tokens are
//     emitted as their raw content).
//   - [Tokenizer.TokenText] and [Tokenizer.LogprobText] give the per-token
//     strings vLLM reports in logprobs (convert_ids_list_to_tokens, with
//     leading-space restoration for Metaspace pre-tokenizers, and the
//     context-based U+FFFD correction of the logprobs processor).
//   - [Output] wraps a Stream with vLLM v1's BaseIncrementalDetokenizer:
//     update (stop strings, min_tokens, include_stop_str_in_output, the
//     stop-terminated last token, trimming surplus tokens after a match)
//     and get_next_output_text(finished, delta=True) with its hold-back.
//
// How the stream differs from decoding the output alone (all of this is
// vLLM's behaviour, reproduced on purpose): a character split between the
// prompt and the first output tokens is completed from the prompt's bytes;
// the first output token keeps its leading space under Strip/Metaspace
// decoders when the prompt is non-empty (DecodeStream diffs against the
// prompt's text), but loses it after an empty prompt; bytes of a character
// that never completes are never emitted (there is no flush, so the U+FFFD
// that Decode shows at the end is absent from the stream); and an invalid
// prefix (the window's text no longer extends what was emitted) restarts
// the stream without context, as vLLM does.
//
// Stop-string behaviour of vLLM that [Output] reproduces and that may
// surprise: lengths are in code points, and bytes of an incomplete
// character still inside the stream are not part of the text at all (they
// neither count toward the hold-back nor can match); when several stop
// strings match in one step the one whose match ends earliest wins, not
// the first listed (equal ends go to the first listed, so with stops "b"
// and "ab" the text "ab" stops on "b" and keeps "a"); min_tokens only
// requires the match to end in the text of a later token, so a stop string
// may begin inside the first min_tokens tokens, while one lying entirely
// inside them is never matched (later checks only look at new text); the
// hold-back applies while min_tokens suppresses matching, too; with
// include_stop_str_in_output the text after the stop string is still cut,
// and a stop-terminated last token (EOS or a stop_token_id) is detokenized
// like any other, so with skip_special_tokens=false the output ends in
// "<|im_end|>" (or whatever the EOS token is), while without it the
// token's text is left out even when it is an ordinary word; the
// stop-terminated token counts toward min_tokens and usage, yet is dropped
// with the other surplus tokens when a stop string completes earlier in
// the same step; and the tokens kept are those up to the first whose text
// boundary reaches the end of the match, so tokens after it that produced
// no text are dropped too.
//
// Not supported: encoding, normalizers (they do not affect decoding), and
// the legacy slow (Python) tokenizers and their detokenize_incrementally
// path. The decoder is
// always the one in tokenizer.json: transformers 5 model-specific classes
// that define their own __init__ (LlamaTokenizer, for one) rebuild the
// decoder in code and ignore tokenizer.json's; for LlamaTokenizer that is
// Sequence[Replace("▁"," "), ByteFallback, Fuse] plus Strip(" ",1,0) when
// add_prefix_space (default true), which is what Llama-family
// tokenizer.json files normally contain anyway, but a file with a different
// decoder (an old Metaspace export, say) would decode differently in
// transformers than here.
package detok

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"unicode/utf8"
)

// Options are the sampling parameters that affect detokenization.
type Options struct {
	// SkipSpecialTokens drops added tokens flagged special (vLLM default
	// true).
	SkipSpecialTokens bool
	// SpacesBetweenSpecialTokens is vLLM's spaces_between_special_tokens
	// (default true). Decode ignores it, as transformers' fast tokenizers
	// do; Stream honours it the way vLLM's FastIncrementalDetokenizer does.
	SpacesBetweenSpecialTokens bool
}

// DefaultOptions returns vLLM's SamplingParams defaults:
// skip_special_tokens=True, spaces_between_special_tokens=True.
func DefaultOptions() Options {
	return Options{SkipSpecialTokens: true, SpacesBetweenSpecialTokens: true}
}

// Tokenizer is an immutable, concurrency-safe decoder built from a
// Hugging Face tokenizer.json.
type Tokenizer struct {
	tokens  []string // id → token string (added tokens take precedence)
	known   []bool   // id has a token
	special []bool   // token string is a special added token
	added   []bool   // id is an added token (special or not)

	dec       decoder
	byteLevel [][]byte // per-id bytes when dec is exactly ByteLevel
	modelType string
	cleanup   bool // transformers' clean_up_tokenization applies
	marker    rune // Metaspace pre-tokenizer replacement, 0 if none
}

type addedToken struct {
	ID      int    `json:"id"`
	Content string `json:"content"`
	Special bool   `json:"special"`
}

type tokenizerFile struct {
	AddedTokens  []addedToken    `json:"added_tokens"`
	Decoder      json.RawMessage `json:"decoder"`
	PreTokenizer json.RawMessage `json:"pre_tokenizer"`
	Model        struct {
		Type  string          `json:"type"`
		Vocab json.RawMessage `json:"vocab"`
	} `json:"model"`
}

type configFile struct {
	CleanUp      *bool `json:"clean_up_tokenization_spaces"`
	AddedDecoder map[string]struct {
		Content string `json:"content"`
		Special bool   `json:"special"`
	} `json:"added_tokens_decoder"`
}

// Load reads dir/tokenizer.json and, when present, dir/tokenizer_config.json.
func Load(dir string) (*Tokenizer, error) {
	tj, err := os.ReadFile(filepath.Join(dir, "tokenizer.json"))
	if err != nil {
		return nil, fmt.Errorf("detok: load tokenizer: %w", err)
	}
	cj, err := os.ReadFile(filepath.Join(dir, "tokenizer_config.json"))
	if errors.Is(err, os.ErrNotExist) {
		cj = nil
	} else if err != nil {
		return nil, fmt.Errorf("detok: load tokenizer config: %w", err)
	}
	t, err := Parse(tj, cj)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", dir, err)
	}
	return t, nil
}

// Parse builds a Tokenizer from the contents of tokenizer.json and an
// optional tokenizer_config.json (nil or empty to omit).
func Parse(tokenizerJSON, configJSON []byte) (*Tokenizer, error) {
	var f tokenizerFile
	if err := json.Unmarshal(tokenizerJSON, &f); err != nil {
		return nil, fmt.Errorf("detok: parse tokenizer.json: %w", err)
	}
	var cfg configFile
	if len(configJSON) > 0 {
		if err := json.Unmarshal(configJSON, &cfg); err != nil {
			return nil, fmt.Errorf("detok: parse tokenizer_config.json: %w", err)
		}
	}
	t := &Tokenizer{modelType: f.Model.Type}

	vocab := map[int]string{}
	if len(f.Model.Vocab) > 0 && string(f.Model.Vocab) != "null" {
		if f.Model.Vocab[0] == '[' { // Unigram: [[piece, score], ...]
			var pieces [][]json.RawMessage
			if err := json.Unmarshal(f.Model.Vocab, &pieces); err != nil {
				return nil, fmt.Errorf("detok: parse %s vocab: %w", f.Model.Type, err)
			}
			for i, p := range pieces {
				if len(p) == 0 {
					return nil, fmt.Errorf("detok: %s vocab entry %d is empty", f.Model.Type, i)
				}
				var s string
				if err := json.Unmarshal(p[0], &s); err != nil {
					return nil, fmt.Errorf("detok: %s vocab entry %d: %w", f.Model.Type, i, err)
				}
				vocab[i] = s
			}
		} else {
			var m map[string]int
			if err := json.Unmarshal(f.Model.Vocab, &m); err != nil {
				return nil, fmt.Errorf("detok: parse %s vocab: %w", f.Model.Type, err)
			}
			for s, id := range m {
				vocab[id] = s
			}
		}
	}
	added := map[int]addedToken{}
	for _, a := range f.AddedTokens {
		added[a.ID] = a
	}
	for k, v := range cfg.AddedDecoder {
		var id int
		if _, err := fmt.Sscan(k, &id); err != nil {
			return nil, fmt.Errorf("detok: tokenizer_config.json added_tokens_decoder key %q: %w", k, err)
		}
		if _, ok := added[id]; !ok {
			added[id] = addedToken{ID: id, Content: v.Content, Special: v.Special}
		}
	}
	maxID := -1
	for id := range vocab {
		maxID = max(maxID, id)
	}
	for id := range added {
		maxID = max(maxID, id)
	}
	n := maxID + 1
	t.tokens = make([]string, n)
	t.known = make([]bool, n)
	t.special = make([]bool, n)
	t.added = make([]bool, n)
	for id, s := range vocab {
		if id >= 0 {
			t.tokens[id], t.known[id] = s, true
		}
	}
	specialContent := map[string]bool{}
	for id, a := range added {
		if id < 0 {
			return nil, fmt.Errorf("detok: added token %q has negative id %d", a.Content, id)
		}
		t.tokens[id], t.known[id], t.added[id] = a.Content, true, true
		if a.Special {
			specialContent[a.Content] = true
		}
	}
	// tokenizers checks specialness by token string, not by id.
	for id := range t.tokens {
		t.special[id] = t.known[id] && specialContent[t.tokens[id]]
	}

	dec, err := parseDecoder(f.Decoder)
	if err != nil {
		return nil, fmt.Errorf("detok: %w", err)
	}
	t.dec = dec
	if _, ok := dec.(byteLevelDecoder); ok {
		t.byteLevel = make([][]byte, n)
		for id, s := range t.tokens {
			if t.known[id] {
				t.byteLevel[id] = appendByteLevel(nil, s)
			}
		}
	}
	t.cleanup = cfg.CleanUp != nil && *cfg.CleanUp && f.Model.Type != "BPE"
	t.marker = metaspaceMarker(f.PreTokenizer)
	return t, nil
}

// metaspaceMarker returns the replacement character of a Metaspace
// pre-tokenizer (top level or inside a Sequence), as vLLM's
// get_leading_space_marker does; 0 when there is none.
func metaspaceMarker(raw json.RawMessage) rune {
	var p struct {
		Type          string            `json:"type"`
		Replacement   *string           `json:"replacement"`
		PreTokenizers []json.RawMessage `json:"pretokenizers"`
	}
	if len(raw) == 0 || json.Unmarshal(raw, &p) != nil {
		return 0
	}
	switch p.Type {
	case "Metaspace":
		if p.Replacement == nil {
			return '▁'
		}
		r, _ := utf8.DecodeRuneInString(*p.Replacement)
		return r
	case "Sequence":
		for _, sub := range p.PreTokenizers {
			var s struct {
				Type string `json:"type"`
			}
			if json.Unmarshal(sub, &s) == nil && s.Type == "Metaspace" {
				return metaspaceMarker(sub)
			}
		}
	}
	return 0
}

// VocabSize returns one more than the largest token id known to the
// tokenizer (model vocabulary and added tokens).
func (t *Tokenizer) VocabSize() int { return len(t.tokens) }

// IsSpecial reports whether id is a special added token, i.e. one that
// skip_special_tokens removes.
func (t *Tokenizer) IsSpecial(id int32) bool {
	return id >= 0 && int(id) < len(t.special) && t.special[id]
}

// Token returns the raw token string of id, as convert_ids_to_tokens does
// (e.g. "Ġhello" or "▁hello"), and false for an unknown id.
func (t *Tokenizer) Token(id int32) (string, bool) {
	if id < 0 || int(id) >= len(t.tokens) || !t.known[id] {
		return "", false
	}
	return t.tokens[id], true
}

// Decode returns the text of ids exactly as transformers'
// tokenizer.decode(ids, skip_special_tokens=opts.SkipSpecialTokens) does;
// unknown ids are dropped, as tokenizers drops them.
func (t *Tokenizer) Decode(ids []int32, opts Options) string {
	s := t.rawDecode(ids, opts.SkipSpecialTokens)
	if t.cleanup {
		s = cleanUpTokenization(s)
	}
	return s
}

// rawDecode is tokenizers' TokenizerImpl::decode (no transformers
// post-processing).
func (t *Tokenizer) rawDecode(ids []int32, skip bool) string {
	if t.byteLevel != nil {
		var stack [256]byte
		buf := stack[:0]
		for _, id := range ids {
			if id < 0 || int(id) >= len(t.tokens) || !t.known[id] || (skip && t.special[id]) {
				continue
			}
			buf = append(buf, t.byteLevel[id]...)
		}
		return lossyString(buf)
	}
	toks := make([]string, 0, len(ids))
	for _, id := range ids {
		if id < 0 || int(id) >= len(t.tokens) || !t.known[id] || (skip && t.special[id]) {
			continue
		}
		toks = append(toks, t.tokens[id])
	}
	if t.dec == nil {
		return strings.Join(toks, " ")
	}
	return strings.Join(t.dec.decodeChain(toks), "")
}

// cleanUpTokenization is transformers' clean_up_tokenization.

func cleanUpTokenization(s string) string {
	// Sequential replaces, in transformers' order (a Replacer would apply
	// them in one pass, which differs on overlaps).
	for _, p := range [][2]string{
		{" .", "."}, {" ?", "?"}, {" !", "!"}, {" ,", ","}, {" ' ", "'"},
		{" n't", "n't"}, {" 'm", "'m"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"},
	} {
		s = strings.ReplaceAll(s, p[0], p[1])
	}
	return s
}

// TokenText returns the string vLLM reports for id in logprobs
// (vllm.tokenizers.detokenizer_utils.convert_ids_list_to_tokens): the
// decode of [id] with special tokens kept, with leading spaces restored
// for tokens starting with the Metaspace marker when the pre-tokenizer is
// Metaspace.
func (t *Tokenizer) TokenText(id int32) string {
	s := t.Decode([]int32{id}, Options{})
	if t.marker == 0 {
		return s
	}
	raw, _ := t.Token(id)
	markers := 0
	for _, c := range raw {
		if c != t.marker {
			break
		}
		markers++
	}
	if markers == 0 {
		return s
	}
	existing := len(s) - len(strings.TrimLeft(s, " "))
	if missing := markers - existing; missing > 0 {
		return strings.Repeat(" ", missing) + s
	}
	return s
}

// LogprobText returns TokenText(id) corrected the way vLLM's logprobs
// processor (_verify_tokens / _correct_decoded_token) corrects strings that
// end in U+FFFD: context holds the previously sampled token ids, oldest
// first (vLLM uses at most the last 4).
func (t *Tokenizer) LogprobText(id int32, context []int32) string {
	s := t.TokenText(id)
	if !strings.HasSuffix(s, "\uFFFD") {
		return s
	}
	if len(context) > 4 {
		context = context[len(context)-4:]
	}
	for n := 1; n <= len(context); n++ {
		ctx := context[len(context)-n:]
		full := t.Decode(append(append([]int32(nil), ctx...), id), Options{})
		if strings.HasSuffix(full, "\uFFFD") {
			continue
		}
		cleanEnd := len(ctx)
		for j := len(ctx) - 1; j >= 0; j-- {
			if !strings.HasSuffix(t.Decode(ctx[j:j+1], Options{}), "\uFFFD") {
				break
			}
			cleanEnd = j
		}
		prefix := ""
		if cleanEnd > 0 {
			prefix = t.Decode(ctx[:cleanEnd], Options{})
		}
		if strings.HasPrefix(full, prefix) {
			return full[len(prefix):]
		}
		pr, fr := []rune(prefix), []rune(full)
		k := 0
		for k < len(pr) && k < len(fr) && pr[k] == fr[k] {
			k++
		}
		return string(fr[k:])
	}
	return ""
}
