// Package tokenize turns text into token ids in pure Go, equal to what Hugging Face tokenizers
// produce for the tokenizer.json it is given, for the byte-level BPE tokenizers of the GPT-2
// family (SmolLM, GPT-2, StarCoder, Falcon): no normalizer, the ByteLevel pre-tokenizer with
// its GPT-2 split pattern, a BPE model without dropout, byte fallback or subword affixes, added
// tokens matched leftmost-longest before pre-tokenization, and a TemplateProcessing,
// ByteLevel or absent post-processor. Any other tokenizer.json is refused with ErrUnsupported
// (the caller then tokenizes in Python), so what Load accepts is encoded exactly; the tests
// compare against tokenizers itself.
//
// govllm tokenizes prompts here so that the embedded interpreter does not: Hugging Face's
// encode costs about as much Python-thread time per request as the rest of the request path.
package tokenize

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"unicode"
	"unicode/utf8"
)

// ErrUnsupported is returned by Load for a tokenizer this package does not reproduce exactly.
var ErrUnsupported = errors.New("tokenize: unsupported tokenizer")

// Encoder encodes text with one tokenizer. It is safe for concurrent use.
type Encoder struct {
	vocab map[string]int32
	// The merges of each left symbol, by right symbol: merges of left id a are
	// [mergeStart[a], mergeStart[a+1]) in mergeRight (sorted) and mergeOut. A slice per symbol
	// keeps a word's lookups in a few cache lines; a map of all pairs missed the cache each time.
	mergeStart []int32
	mergeRight []int32
	mergeOut   []merge
	bytes      [256]int32 // the id of each byte's ByteLevel character; -1: none (the byte is dropped, as tokenizers does without an unk token)
	added      map[byte][]addedToken
	prefix     []int32 // TemplateProcessing's single template around the sequence: ids before it
	suffix     []int32 // and after it

	mu    sync.Mutex
	cache map[string][]int32 // pre-token -> ids
}

type merge struct {
	rank int32
	id   int32
}

type addedToken struct {
	content string
	id      int32
}

// maxCache bounds the pre-token cache (a map reset when full: prompts repeat words, not
// documents).
const maxCache = 1 << 16

type fileJSON struct {
	AddedTokens []struct {
		ID         int32  `json:"id"`
		Content    string `json:"content"`
		SingleWord bool   `json:"single_word"`
		LStrip     bool   `json:"lstrip"`
		RStrip     bool   `json:"rstrip"`
	} `json:"added_tokens"`
	Normalizer    json.RawMessage `json:"normalizer"`
	PreTokenizer  json.RawMessage `json:"pre_tokenizer"`
	PostProcessor json.RawMessage `json:"post_processor"`
	Model         struct {
		Type                    string            `json:"type"`
		Dropout                 *float64          `json:"dropout"`
		ContinuingSubwordPrefix string            `json:"continuing_subword_prefix"`
		EndOfWordSuffix         string            `json:"end_of_word_suffix"`
		ByteFallback            bool              `json:"byte_fallback"`
		IgnoreMerges            bool              `json:"ignore_merges"`
		UnkToken                *string           `json:"unk_token"`
		Vocab                   map[string]int32  `json:"vocab"`
		Merges                  []json.RawMessage `json:"merges"`
	} `json:"model"`
}

// Load reads dir/tokenizer.json.
func Load(dir string) (*Encoder, error) {
	b, err := os.ReadFile(filepath.Join(dir, "tokenizer.json"))
	if err != nil {
		return nil, fmt.Errorf("tokenize: %w", err)
	}
	return Parse(b)
}

func unsupported(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrUnsupported, fmt.Sprintf(format, args...))
}

func isNull(raw json.RawMessage) bool {
	s := strings.TrimSpace(string(raw))
	return s == "" || s == "null"
}

// Parse builds an Encoder from the contents of a tokenizer.json.
func Parse(tokenizerJSON []byte) (*Encoder, error) {
	var f fileJSON
	if err := json.Unmarshal(tokenizerJSON, &f); err != nil {
		return nil, fmt.Errorf("tokenize: parse tokenizer.json: %w", err)
	}
	m := &f.Model
	switch {
	case m.Type != "BPE":
		return nil, unsupported("model %q", m.Type)
	case m.Dropout != nil && *m.Dropout != 0, m.ContinuingSubwordPrefix != "", m.EndOfWordSuffix != "", m.ByteFallback, m.IgnoreMerges, m.UnkToken != nil:
		return nil, unsupported("BPE options (dropout, subword affixes, byte_fallback, ignore_merges or an unk token)")
	case !isNull(f.Normalizer):
		return nil, unsupported("a normalizer")
	}
	if err := checkPreTokenizer(f.PreTokenizer); err != nil {
		return nil, err
	}
	e := &Encoder{vocab: m.Vocab, added: map[byte][]addedToken{}, cache: map[string][]int32{}}
	for b := 0; b < 256; b++ {
		id, ok := e.vocab[string(byteChar[b])]
		if !ok {
			id = -1
		}
		e.bytes[b] = id
	}
	var pairs []mergePair
	for rank, raw := range m.Merges {
		var a, b string
		var pair []string
		if err := json.Unmarshal(raw, &pair); err == nil && len(pair) == 2 {
			a, b = pair[0], pair[1]
		} else {
			var s string
			if err := json.Unmarshal(raw, &s); err != nil {
				return nil, fmt.Errorf("tokenize: merge %d: %s", rank, raw)
			}
			var found bool
			a, b, found = strings.Cut(s, " ")
			if !found {
				return nil, fmt.Errorf("tokenize: merge %d: %q", rank, s)
			}
		}
		ia, oka := e.vocab[a]
		ib, okb := e.vocab[b]
		im, okm := e.vocab[a+b]
		if !oka || !okb || !okm {
			return nil, unsupported("merge %d (%q %q) outside the vocabulary", rank, a, b)
		}
		pairs = append(pairs, mergePair{left: ia, right: ib, merge: merge{rank: int32(rank), id: im}})
	}
	e.indexMerges(pairs)
	specials := map[string]int32{}
	for _, t := range f.AddedTokens {
		if t.SingleWord || t.LStrip || t.RStrip {
			return nil, unsupported("added token %q with single_word, lstrip or rstrip", t.Content)
		}
		if t.Content == "" {
			continue
		}
		e.added[t.Content[0]] = append(e.added[t.Content[0]], addedToken{content: t.Content, id: t.ID})
		specials[t.Content] = t.ID
	}
	for k := range e.added {
		list := e.added[k]
		sort.SliceStable(list, func(i, j int) bool { return len(list[i].content) > len(list[j].content) })
	}
	if err := e.readPostProcessor(f.PostProcessor, specials); err != nil {
		return nil, err
	}
	return e, nil
}

func checkPreTokenizer(raw json.RawMessage) error {
	var p struct {
		Type           string `json:"type"`
		AddPrefixSpace bool   `json:"add_prefix_space"`
		UseRegex       *bool  `json:"use_regex"`
	}
	if isNull(raw) || json.Unmarshal(raw, &p) != nil {
		return unsupported("no pre-tokenizer")
	}
	if p.Type != "ByteLevel" || p.AddPrefixSpace || (p.UseRegex != nil && !*p.UseRegex) {
		return unsupported("pre-tokenizer %s (only ByteLevel with the GPT-2 pattern, no prefix space)", raw)
	}
	return nil
}

func (e *Encoder) readPostProcessor(raw json.RawMessage, specials map[string]int32) error {
	if isNull(raw) {
		return nil
	}
	var p struct {
		Type   string `json:"type"`
		Single []struct {
			SpecialToken *struct {
				ID string `json:"id"`
			} `json:"SpecialToken"`
			Sequence *struct {
				ID string `json:"id"`
			} `json:"Sequence"`
		} `json:"single"`
		SpecialTokens map[string]struct {
			IDs []int32 `json:"ids"`
		} `json:"special_tokens"`
	}
	if err := json.Unmarshal(raw, &p); err != nil {
		return fmt.Errorf("tokenize: post_processor: %w", err)
	}
	switch p.Type {
	case "ByteLevel":
		return nil
	case "TemplateProcessing":
	default:
		return unsupported("post-processor %q", p.Type)
	}
	seen := false
	for _, piece := range p.Single {
		switch {
		case piece.Sequence != nil:
			if seen || piece.Sequence.ID != "A" {
				return unsupported("a TemplateProcessing single template with %q", piece.Sequence.ID)
			}
			seen = true
		case piece.SpecialToken != nil:
			st, ok := p.SpecialTokens[piece.SpecialToken.ID]
			if !ok {
				return fmt.Errorf("tokenize: post_processor names unknown special token %q", piece.SpecialToken.ID)
			}
			if seen {
				e.suffix = append(e.suffix, st.IDs...)
			} else {
				e.prefix = append(e.prefix, st.IDs...)
			}
		}
	}
	if !seen {
		return unsupported("a TemplateProcessing single template without the sequence")
	}
	return nil
}

type mergePair struct {
	left, right int32
	merge
}

// indexMerges builds the per-left-symbol merge lists; of a pair listed twice the last one
// counts, as in tokenizers (whose map of merges keeps the last insertion).
func (e *Encoder) indexMerges(pairs []mergePair) {
	sort.SliceStable(pairs, func(i, j int) bool {
		if pairs[i].left != pairs[j].left {
			return pairs[i].left < pairs[j].left
		}
		return pairs[i].right < pairs[j].right
	})
	maxID := int32(0)
	for _, id := range e.vocab {
		maxID = max(maxID, id)
	}
	e.mergeStart = make([]int32, maxID+2)
	for i, p := range pairs {
		if i > 0 && pairs[i-1].left == p.left && pairs[i-1].right == p.right {
			e.mergeOut[len(e.mergeOut)-1] = p.merge // stable sort: this one came later in the file
			continue
		}
		e.mergeRight = append(e.mergeRight, p.right)
		e.mergeOut = append(e.mergeOut, p.merge)
		e.mergeStart[p.left+1] = int32(len(e.mergeRight))
	}
	for a := 1; a < len(e.mergeStart); a++ {
		e.mergeStart[a] = max(e.mergeStart[a], e.mergeStart[a-1])
	}
}

// noMerge is the rank of a pair that does not merge.
const noMerge = int32(1<<31 - 1)

// lookup returns the merge of the pair (a, b), or one of rank noMerge.
func (e *Encoder) lookup(a, b int32) merge {
	if a < 0 || int(a)+1 >= len(e.mergeStart) {
		return merge{rank: noMerge}
	}
	lo, hi := int(e.mergeStart[a]), int(e.mergeStart[a+1])
	for lo < hi {
		mid := int(uint(lo+hi) >> 1)
		switch r := e.mergeRight[mid]; {
		case r == b:
			return e.mergeOut[mid]
		case r < b:
			lo = mid + 1
		default:
			hi = mid
		}
	}
	return merge{rank: noMerge}
}

// Encode returns the ids of text, as tokenizer.encode(text, add_special_tokens=addSpecial)
// returns them.
func (e *Encoder) Encode(text string, addSpecial bool) []int32 {
	out := make([]int32, 0, len(text)/3+len(e.prefix)+len(e.suffix)+1)
	if addSpecial {
		out = append(out, e.prefix...)
	}
	for len(text) > 0 {
		at, tok := e.nextAdded(text)
		out = e.appendSegment(out, text[:at])
		if tok == nil {
			break
		}
		out = append(out, tok.id)
		text = text[at+len(tok.content):]
	}
	if addSpecial {
		out = append(out, e.suffix...)
	}
	return out
}

// nextAdded finds the leftmost added token in text (the longest one there): its offset and the
// token, or len(text) and nil.
func (e *Encoder) nextAdded(text string) (int, *addedToken) {
	if len(e.added) == 0 {
		return len(text), nil
	}
	for i := 0; i < len(text); i++ {
		list := e.added[text[i]]
		for j := range list {
			if strings.HasPrefix(text[i:], list[j].content) {
				return i, &list[j]
			}
		}
	}
	return len(text), nil
}

// appendSegment encodes text that holds no added token.
func (e *Encoder) appendSegment(out []int32, text string) []int32 {
	for len(text) > 0 {
		n := splitGPT2(text)
		out = e.appendWord(out, text[:n])
		text = text[n:]
	}
	return out
}

func (e *Encoder) appendWord(out []int32, word string) []int32 {
	e.mu.Lock()
	ids, ok := e.cache[word]
	e.mu.Unlock()
	if ok {
		return append(out, ids...)
	}
	syms := make([]int32, 0, len(word))
	for i := 0; i < len(word); i++ {
		if id := e.bytes[word[i]]; id >= 0 {
			syms = append(syms, id)
		}
	}
	syms = e.bpe(syms)
	e.mu.Lock()
	if len(e.cache) >= maxCache {
		clear(e.cache)
	}
	e.cache[strings.Clone(word)] = syms // word may point into the caller's memory (the shim's callback)
	e.mu.Unlock()
	return append(out, syms...)
}

// bpe merges syms, always the pair of lowest rank first (the leftmost among equals), as
// tokenizers' Word::merge_all does. pairs[i] is the merge of syms[i] and syms[i+1]; a merge
// looks up only the two pairs it changes.
func (e *Encoder) bpe(syms []int32) []int32 {
	if len(syms) < 2 {
		return syms
	}
	var small [32]merge
	pairs := small[:0]
	for i := 0; i+1 < len(syms); i++ {
		pairs = append(pairs, e.lookup(syms[i], syms[i+1]))
	}
	for {
		at := -1
		for i := range pairs {
			if pairs[i].rank != noMerge && (at < 0 || pairs[i].rank < pairs[at].rank) {
				at = i
			}
		}
		if at < 0 {
			return syms
		}
		syms[at] = pairs[at].id
		syms = append(syms[:at+1], syms[at+2:]...)
		pairs = append(pairs[:at], pairs[at+1:]...)
		if at > 0 {
			pairs[at-1] = e.lookup(syms[at-1], syms[at])
		}
		if at < len(pairs) {
			pairs[at] = e.lookup(syms[at], syms[at+1])
		}
	}
}

// splitGPT2 returns the length of the first pre-token of s under GPT-2's pattern
// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// (alternatives tried in order at the start of s).
func splitGPT2(s string) int {
	if s[0] == '\'' && len(s) > 1 {
		for _, c := range [...]string{"s", "t", "re", "ve", "m", "ll", "d"} {
			if strings.HasPrefix(s[1:], c) {
				return 1 + len(c)
			}
		}
	}
	start := 0
	if s[0] == ' ' && len(s) > 1 {
		start = 1
	}
	r, size := utf8.DecodeRuneInString(s[start:])
	switch {
	case unicode.IsLetter(r):
		return start + size + runLen(s[start+size:], unicode.IsLetter)
	case unicode.IsNumber(r):
		return start + size + runLen(s[start+size:], unicode.IsNumber)
	case !isSpace(r):
		return start + size + runLen(s[start+size:], isOther)
	}
	// Whitespace: \s+(?!\S) leaves the last whitespace character before a non-space to the
	// next pre-token (which may start with that space); a lone one before a non-space is \s+.
	n := 0
	last := 0
	for n < len(s) {
		r, size := utf8.DecodeRuneInString(s[n:])
		if !isSpace(r) {
			break
		}
		last = size
		n += size
	}
	if n == len(s) || n == last {
		return n
	}
	return n - last
}

func runLen(s string, in func(rune) bool) int {
	n := 0
	for n < len(s) {
		r, size := utf8.DecodeRuneInString(s[n:])
		if !in(r) {
			break
		}
		n += size
	}
	return n
}

// isSpace is the regex's \s: Unicode White_Space.
func isSpace(r rune) bool { return unicode.IsSpace(r) }

func isOther(r rune) bool { return !isSpace(r) && !unicode.IsLetter(r) && !unicode.IsNumber(r) }

// byteChar is GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to
// U+0100 onwards, in byte order.
var byteChar = func() (m [256]rune) {
	n := 0
	for b := 0; b < 256; b++ {
		if (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF) {
			m[b] = rune(b)
		} else {
			m[b] = rune(256 + n)
			n++
		}
	}
	return m
}()
