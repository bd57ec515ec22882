package detok

import (
	"strings"
)

// Stream is an incremental detokenizer for one request. It reproduces vLLM
// v1's FastIncrementalDetokenizer, which drives tokenizers' DecodeStream:
// each step decodes a small window of ids, emits the text beyond the
// previously emitted prefix, and emits nothing while the window's text ends
// in U+FFFD (an incomplete UTF-8 character), so half characters are held
// back until they complete. A Stream is not safe for concurrent use.
type Stream struct {
	t      *Tokenizer
	skip   bool
	spaces bool // vLLM: skip_special_tokens || spaces_between_special_tokens

	ids         []int32
	prefix      string
	prefixIndex int
	lastAdded   bool
}

// NewStream starts an incremental decode primed with the prompt's token ids,
// as vLLM primes DecodeStream with prompt_token_ids. Passing the whole
// prompt reproduces vLLM exactly; a tail of the prompt (say its last 8
// ids) gives the same text except in vLLM's corner case of a prompt whose
// decode ends in an incomplete character, where vLLM's first emitted chunk
// repeats the primed prompt text. promptTail is copied.
func (t *Tokenizer) NewStream(opts Options, promptTail []int32) *Stream {
	s := &Stream{
		t:      t,
		skip:   opts.SkipSpecialTokens,
		spaces: opts.SkipSpecialTokens || opts.SpacesBetweenSpecialTokens,
		ids:    append(make([]int32, 0, len(promptTail)+8), promptTail...),
	}
	if !s.spaces && !t.hasAdded() {
		s.spaces = true
	}
	return s
}

func (t *Tokenizer) hasAdded() bool {
	for _, a := range t.added {
		if a {
			return true
		}
	}
	return false
}

// Step feeds newly generated token ids and returns the text they complete
// (possibly empty while a multi-byte character is incomplete). The
// concatenation of all Step results equals vLLM's output text.
func (s *Stream) Step(ids ...int32) string {
	if len(ids) == 1 {
		return s.next(ids[0])
	}
	var b strings.Builder
	for _, id := range ids {
		b.WriteString(s.next(id))
	}
	return b.String()
}

// next is FastIncrementalDetokenizer.decode_next for one id.
func (s *Stream) next(id int32) string {
	var text string
	if id < 0 {
		// vLLM catches the OverflowError of a negative id and emits
		// nothing; the DecodeStream state is untouched.
		text = ""
	} else if out, ok := s.step(id); ok {
		text = out
	}
	if !s.spaces {
		isAdded := int(id) < len(s.t.added) && id >= 0 && s.t.added[id]
		if isAdded && s.lastAdded {
			text = s.t.tokens[id]
		}
		s.lastAdded = isAdded
	}
	return text
}

// step is tokenizers' step_decode_stream, with vLLM's recovery from an
// invalid prefix (restart the stream without the prompt and step again).
func (s *Stream) step(id int32) (string, bool) {
	out, ok, invalid := s.rawStep(id)
	if invalid {
		s.ids = s.ids[:0]
		s.prefix = ""
		s.prefixIndex = 0
		out, ok, _ = s.rawStep(id)
	}
	return out, ok
}

func (s *Stream) rawStep(id int32) (out string, ok, invalidPrefix bool) {
	t := s.t
	if s.prefix == "" && len(s.ids) > 0 {
		p := t.rawDecode(s.ids, s.skip)
		if !strings.HasSuffix(p, "\uFFFD") {
			s.prefix = p
			s.prefixIndex = len(s.ids)
		}
	}
	s.ids = append(s.ids, id)
	str := t.rawDecode(s.ids, s.skip)
	if len(str) <= len(s.prefix) || strings.HasSuffix(str, "\uFFFD") {
		return "", false, false
	}
	if !strings.HasPrefix(str, s.prefix) {
		return "", false, true
	}
	out = str[len(s.prefix):]
	newPrefixIndex := len(s.ids) - s.prefixIndex
	n := copy(s.ids, s.ids[s.prefixIndex:])
	s.ids = s.ids[:n]
	s.prefix = t.rawDecode(s.ids, s.skip)
	s.prefixIndex = newPrefixIndex
	return out, true, false
}
