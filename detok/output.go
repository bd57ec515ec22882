package detok

import (
	"strings"
	"unicode/utf8"
)

// OutputOptions are the detokenization options plus vLLM's stop-string
// sampling parameters.
type OutputOptions struct {
	Options
	// Stop lists the stop strings. Empty strings are ignored (vLLM's
	// server rejects them). Stop strings are expected to be valid UTF-8,
	// as Python strings always are; invalid bytes are replaced by U+FFFD.
	Stop []string
	// IncludeStop is include_stop_str_in_output: keep the matched stop
	// string (and a stop-terminating token's text) in the output.
	IncludeStop bool
	// MinTokens is min_tokens: a stop string only matches if it ends in
	// the text of output token MinTokens+1 or later (it may begin
	// earlier).
	MinTokens int
}

// Output is the per-choice output state of vLLM v1's
// BaseIncrementalDetokenizer: it detokenizes each engine step's ids with a
// [Stream], checks the stop strings, truncates the text and drops surplus
// tokens on a match, and hands out the streamed deltas with the stop-string
// hold-back. An Output is not safe for concurrent use.
type Output struct {
	st        *Stream
	stop      []string
	stopLen   []int // characters (code points) in each stop string
	include   bool
	minTokens int
	holdBack  int // characters (code points) Next holds back while unfinished

	ids     []int32
	text    strings.Builder // append-only; n may end before its length after a stop truncation
	n       int             // bytes of text that are the output text
	sent    int             // bytes of text already returned by Next
	offsets []int           // per step: text length at each new token boundary
	done    bool            // a stop string matched
}

// NewOutput starts the output of one choice whose prompt (all of its ids,
// as vLLM primes its decode stream with the whole prompt) is prompt.
func (t *Tokenizer) NewOutput(opts OutputOptions, prompt []int32) *Output {
	o := &Output{
		st:        t.NewStream(opts.Options, prompt),
		include:   opts.IncludeStop,
		minTokens: opts.MinTokens,
	}
	longest := 0
	for _, s := range opts.Stop {
		if s == "" {
			continue
		}
		s = strings.ToValidUTF8(s, "\uFFFD")
		n := utf8.RuneCountInString(s)
		o.stop = append(o.stop, s)
		o.stopLen = append(o.stopLen, n)
		longest = max(longest, n)
	}
	if len(o.stop) > 0 && !o.include {
		o.holdBack = longest - 1
	}
	return o
}

// Update feeds one engine step's new token ids for this choice.
// stopTerminated reports that the engine finished the choice with
// finish_reason STOP on the last id (EOS or a stop token id): that id is
// counted but, unless IncludeStop, not detokenized. Update returns the
// matched stop string, if any; on a match the ids after the one completing
// the stop string are dropped (NumTokens and TokenIDs exclude them) and the
// text is cut after the stop string (IncludeStop) or before it. Once a stop
// string has matched, Update does nothing and returns ("", false).
func (o *Output) Update(ids []int32, stopTerminated bool) (stop string, matched bool) {
	if o.done || len(ids) == 0 {
		return "", false
	}
	decode := ids
	if stopTerminated && !o.include {
		decode = ids[:len(ids)-1]
	}
	first := len(o.ids)
	checking := len(o.stop) > 0
	if checking {
		o.offsets = append(o.offsets[:0], o.n)
	}
	for _, id := range decode {
		o.ids = append(o.ids, id)
		piece := o.st.next(id)
		o.text.WriteString(piece)
		o.n += len(piece)
		if checking {
			o.offsets = append(o.offsets, o.n)
		}
	}
	if len(decode) < len(ids) {
		o.ids = append(o.ids, ids[len(ids)-1])
		if checking {
			o.offsets = append(o.offsets, o.n)
		}
	}
	if !checking || len(o.ids) <= o.minTokens {
		return "", false
	}
	return o.checkStop(first)
}

// checkStop is vLLM's check_stop_strings over the text added since the
// boundary of output token max(MinTokens, first), followed by the token
// trimming and text truncation of BaseIncrementalDetokenizer.update.
func (o *Output) checkStop(first int) (string, bool) {
	from := o.offsets[max(o.minTokens-first, 0)]
	if from == o.n {
		return "", false
	}
	text := o.text.String()[:o.n]
	best, bestStart, bestEnd := -1, 0, 0
	for i, s := range o.stop {
		// A match must end after from: search from len(s)-1 characters
		// before it.
		start := backChars(text, from, o.stopLen[i]-1)
		j := strings.Index(text[start:], s)
		if j < 0 {
			continue
		}
		if end := start + j + len(s); best < 0 || end < bestEnd {
			best, bestStart, bestEnd = i, start+j, end
		}
	}
	if best < 0 {
		return "", false
	}
	// Keep the new ids up to the first whose text boundary reaches the end
	// of the match (bisect_left from 1).
	kept := len(o.offsets)
	for k := 1; k < len(o.offsets); k++ {
		if o.offsets[k] >= bestEnd {
			kept = k
			break
		}
	}
	o.ids = o.ids[:first+kept]
	if o.include {
		o.n = bestEnd
	} else {
		o.n = bestStart
	}
	o.done = true
	return o.stop[best], true
}

// Next returns the output text not returned by a previous Next, as vLLM's
// get_next_output_text(finished, delta=True): while !finished, the last
// len(longest stop string)-1 characters (code points) are held back when
// stop strings are set and IncludeStop is false.
func (o *Output) Next(finished bool) string {
	text := o.text.String()[:o.n]
	end := len(text)
	if !finished && o.holdBack > 0 {
		end = backChars(text, end, o.holdBack) // 0: all held back
	}
	if o.sent >= end {
		return ""
	}
	s := text[o.sent:end]
	o.sent = end
	return s
}

// NumTokens returns the number of output tokens counted (what usage
// reports): every id fed, including a stop-terminating one, less those
// dropped after a stop-string match.
func (o *Output) NumTokens() int { return len(o.ids) }

// Text returns the whole output text so far. Once finished, it equals the
// concatenation of the Next results.
func (o *Output) Text() string { return o.text.String()[:o.n] }

// TokenIDs returns the output ids kept (after a stop-string trim). The
// slice is owned by the Output and valid until the next Update.
func (o *Output) TokenIDs() []int32 { return o.ids[:len(o.ids):len(o.ids)] }

// backChars returns the byte offset k characters (code points) before byte
// offset end of the valid UTF-8 string s, or 0 when s[:end] has fewer.
func backChars(s string, end, k int) int {
	for k > 0 && end > 0 {
		end--
		if s[end]&0xC0 != 0x80 {
			k--
		}
	}
	return end
}
