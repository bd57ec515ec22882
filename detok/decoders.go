package detok

import (
	"encoding/json"
	"fmt"
	"strings"
	"unicode/utf8"
)

// decoder is one step of a Hugging Face decoder pipeline. decodeChain
// mirrors the tokenizers crate's Decoder::decode_chain: it maps a list of
// token strings to a new list; the final text is the concatenation.
type decoder interface {
	decodeChain(tokens []string) []string
}

// rawDecoder is the JSON shape shared by all decoder types.
type rawDecoder struct {
	Type          string            `json:"type"`
	Decoders      []json.RawMessage `json:"decoders"`
	Pattern       map[string]string `json:"pattern"`
	Content       json.RawMessage   `json:"content"`
	Start         int               `json:"start"`
	Stop          int               `json:"stop"`
	Replacement   string            `json:"replacement"`
	PrependScheme string            `json:"prepend_scheme"`
	AddPrefix     *bool             `json:"add_prefix_space"`
}

// parseDecoder builds a decoder from its tokenizer.json representation.
// A JSON null yields (nil, nil): tokens are joined with single spaces.
func parseDecoder(raw json.RawMessage) (decoder, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	var r rawDecoder
	if err := json.Unmarshal(raw, &r); err != nil {
		return nil, fmt.Errorf("parse decoder: %w", err)
	}
	switch r.Type {
	case "ByteLevel":
		return byteLevelDecoder{}, nil
	case "ByteFallback":
		return byteFallbackDecoder{}, nil
	case "Fuse":
		return fuseDecoder{}, nil
	case "Replace":
		pat, ok := r.Pattern["String"]
		if !ok {
			return nil, fmt.Errorf("decoder Replace: unsupported pattern %v (only String patterns are supported)", r.Pattern)
		}
		var content string
		if err := json.Unmarshal(r.Content, &content); err != nil {
			return nil, fmt.Errorf("decoder Replace: content: %w", err)
		}
		return replaceDecoder{pattern: pat, content: content}, nil
	case "Strip":
		var content string
		if err := json.Unmarshal(r.Content, &content); err != nil {
			return nil, fmt.Errorf("decoder Strip: content: %w", err)
		}
		c, n := utf8.DecodeRuneInString(content)
		if n == 0 || n != len(content) {
			return nil, fmt.Errorf("decoder Strip: content %q is not a single character", content)
		}
		if r.Start < 0 || r.Stop < 0 {
			return nil, fmt.Errorf("decoder Strip: negative start/stop %d/%d", r.Start, r.Stop)
		}
		return stripDecoder{content: c, start: r.Start, stop: r.Stop}, nil
	case "Metaspace":
		rep := r.Replacement
		if rep == "" {
			rep = "▁"
		}
		c, n := utf8.DecodeRuneInString(rep)
		if n != len(rep) {
			return nil, fmt.Errorf("decoder Metaspace: replacement %q is not a single character", rep)
		}
		stripFirst := true
		switch r.PrependScheme {
		case "", "always", "first":
			if r.PrependScheme == "" && r.AddPrefix != nil && !*r.AddPrefix {
				stripFirst = false
			}
		case "never":
			stripFirst = false
		default:
			return nil, fmt.Errorf("decoder Metaspace: unknown prepend_scheme %q", r.PrependScheme)
		}
		return metaspaceDecoder{replacement: c, stripFirst: stripFirst}, nil
	case "Sequence":
		seq := make(sequenceDecoder, 0, len(r.Decoders))
		for i, sub := range r.Decoders {
			d, err := parseDecoder(sub)
			if err != nil {
				return nil, fmt.Errorf("decoder Sequence[%d]: %w", i, err)
			}
			if d == nil {
				return nil, fmt.Errorf("decoder Sequence[%d]: null decoder", i)
			}
			seq = append(seq, d)
		}
		return seq, nil
	case "":
		return nil, fmt.Errorf("decoder without a type")
	default:
		return nil, fmt.Errorf("unsupported decoder %q (supported: ByteLevel, ByteFallback, Fuse, Replace, Strip, Metaspace, Sequence)", r.Type)
	}
}

// sequenceDecoder applies its decoders in order.
type sequenceDecoder []decoder

func (s sequenceDecoder) decodeChain(tokens []string) []string {
	for _, d := range s {
		tokens = d.decodeChain(tokens)
	}
	return tokens
}

// byteLevelDecoder undoes GPT-2's byte-to-unicode mapping. A token any of
// whose characters is outside the table contributes its raw UTF-8 bytes.
// The result is one string, decoded lossily (maximal-subpart U+FFFD).
type byteLevelDecoder struct{}

func (byteLevelDecoder) decodeChain(tokens []string) []string {
	var buf []byte
	for _, t := range tokens {
		buf = appendByteLevel(buf, t)
	}
	return []string{lossyString(buf)}
}

// appendByteLevel appends the bytes token t stands for under the byte-level
// table, or t's own bytes when a character is not in the table.
func appendByteLevel(buf []byte, t string) []byte {
	start := len(buf)
	for _, c := range t {
		if c < 0 || int(c) >= len(unicodeToByte) || unicodeToByte[c] < 0 {
			return append(buf[:start], t...)
		}
		buf = append(buf, byte(unicodeToByte[c]))
	}
	return buf
}

// unicodeToByte inverts GPT-2's bytes_to_unicode table; -1 marks runes that
// are not in it. All mapped runes are below 324.
var unicodeToByte = func() [324]int16 {
	var t [324]int16
	for i := range t {
		t[i] = -1
	}
	n := 0
	for b := 0; b < 256; b++ {
		if (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF) {
			t[b] = int16(b)
		} else {
			t[256+n] = int16(b)
			n++
		}
	}
	return t
}()

// byteFallbackDecoder turns runs of <0xAB> tokens into the text they
// encode; a run that is not valid UTF-8 becomes one U+FFFD per byte.
type byteFallbackDecoder struct{}

func (byteFallbackDecoder) decodeChain(tokens []string) []string {
	out := make([]string, 0, len(tokens))
	var pending []byte
	flush := func() {
		if len(pending) == 0 {
			return
		}
		if utf8.Valid(pending) {
			out = append(out, string(pending))
		} else {
			for range pending {
				out = append(out, "\uFFFD")
			}
		}
		pending = pending[:0]
	}
	for _, t := range tokens {
		if b, ok := parseByteToken(t); ok {
			pending = append(pending, b)
			continue
		}
		flush()
		out = append(out, t)
	}
	flush()
	return out
}

// parseByteToken recognises "<0xAB>" tokens (either hex case).
func parseByteToken(t string) (byte, bool) {
	if len(t) != 6 || !strings.HasPrefix(t, "<0x") || t[5] != '>' {
		return 0, false
	}
	hi, ok1 := hexVal(t[3])
	lo, ok2 := hexVal(t[4])
	if !ok1 || !ok2 {
		return 0, false
	}
	return hi<<4 | lo, true
}

func hexVal(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10, true
	case c >= 'A' && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

// fuseDecoder joins all tokens into one.
type fuseDecoder struct{}

func (fuseDecoder) decodeChain(tokens []string) []string {
	return []string{strings.Join(tokens, "")}
}

// replaceDecoder replaces a literal string in every token.
type replaceDecoder struct{ pattern, content string }

func (r replaceDecoder) decodeChain(tokens []string) []string {
	out := make([]string, len(tokens))
	for i, t := range tokens {
		out[i] = strings.ReplaceAll(t, r.pattern, r.content)
	}
	return out
}

// stripDecoder removes up to start leading and stop trailing occurrences
// of content from every token.
type stripDecoder struct {
	content     rune
	start, stop int
}

func (s stripDecoder) decodeChain(tokens []string) []string {
	out := make([]string, len(tokens))
	for i, t := range tokens {
		rs := []rune(t)
		lo := 0
		for lo < s.start && lo < len(rs) && rs[lo] == s.content {
			lo++
		}
		hi := len(rs)
		for k := 0; k < s.stop && hi > 0 && rs[hi-1] == s.content; k++ {
			hi--
		}
		if hi < lo {
			hi = lo
		}
		out[i] = string(rs[lo:hi])
	}
	return out
}

// metaspaceDecoder maps the replacement character back to a space; in the
// first token (unless prepend_scheme is "never") it is dropped entirely,
// matching tokenizers' Metaspace::decode_chain.
type metaspaceDecoder struct {
	replacement rune
	stripFirst  bool
}

func (m metaspaceDecoder) decodeChain(tokens []string) []string {
	out := make([]string, len(tokens))
	for i, t := range tokens {
		var b strings.Builder
		b.Grow(len(t))
		for _, c := range t {
			if c == m.replacement {
				if i == 0 && m.stripFirst {
					continue
				}
				b.WriteByte(' ')
				continue
			}
			b.WriteRune(c)
		}
		out[i] = b.String()
	}
	return out
}

// lossyString converts b to a string like Rust's String::from_utf8_lossy
// (and Python's errors="replace"): each maximal invalid subpart becomes a
// single U+FFFD.
func lossyString(b []byte) string {
	if utf8.Valid(b) {
		return string(b)
	}
	var sb strings.Builder
	sb.Grow(len(b) + 8)
	for i := 0; i < len(b); {
		r, n := utf8.DecodeRune(b[i:])
		if r != utf8.RuneError || n > 1 {
			sb.Write(b[i : i+n])
			i += n
			continue
		}
		sb.WriteString("\uFFFD")
		i += maximalSubpart(b[i:])
	}
	return sb.String()
}

// maximalSubpart returns the length of the maximal prefix of b that could
// start a well-formed UTF-8 sequence (at least 1); b[0] starts an invalid
// or truncated sequence.
func maximalSubpart(b []byte) int {
	c := b[0]
	var need int
	lo, hi := byte(0x80), byte(0xBF)
	switch {
	case c >= 0xC2 && c <= 0xDF:
		need = 1
	case c == 0xE0:
		need, lo = 2, 0xA0
	case c >= 0xE1 && c <= 0xEC, c == 0xEE, c == 0xEF:
		need = 2
	case c == 0xED:
		need, hi = 2, 0x9F
	case c == 0xF0:
		need, lo = 3, 0x90
	case c >= 0xF1 && c <= 0xF3:
		need = 3
	case c == 0xF4:
		need, hi = 3, 0x8F
	default:
		return 1
	}
	n := 1
	for k := 0; k < need && n < len(b); k++ {
		x := b[n]
		if x < lo || x > hi {
			break
		}
		lo, hi = 0x80, 0xBF
		n++
	}
	return n
}
