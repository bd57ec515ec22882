package engine

import (
	"encoding/binary"
	"math"

	"github.com/govllm/govllm/detok"
)

// Go owns the text of a request whose backend sends token ids only (the vLLM and transformers
// backends: their READY names a tokenizer): each choice's tokens go through a detok.Output,
// which detokenizes them as vLLM's output processor does, matches stop strings across token
// boundaries and holds back text that may still become one. A stop string matched here ends the
// choice at once (its later tokens are dropped, usage counts what was kept) and the engine is
// told to stop it with cmdStopChoice.

// choiceText is the Go-side output state of one choice. The poller alone uses it.
type choiceText struct {
	out  *detok.Output
	done bool // finished: later events for the choice are dropped
}

// textState is the Go-side output of a request, created on its prompt event.
type textState struct {
	tok      *detok.Tokenizer
	opts     detok.OutputOptions
	prompt   []int32
	logprobs int // top logprobs per token asked for; -1: none
	choices  []choiceText
	// stopTokenIDs are the request's stop_token_ids, for the stop reason of a choice the
	// engine ended with "stop".
	stopTokenIDs []int32
}

func newTextState(tok *detok.Tokenizer, sp *SamplingParams, prompt []int32) *textState {
	opts := detok.OutputOptions{
		Options:     detok.DefaultOptions(),
		Stop:        sp.Stop,
		IncludeStop: sp.IncludeStopStrInOutput,
		MinTokens:   sp.MinTokens,
	}
	if sp.SkipSpecialTokens != nil {
		opts.SkipSpecialTokens = *sp.SkipSpecialTokens
	}
	if sp.SpacesBetweenSpecialTokens != nil {
		opts.SpacesBetweenSpecialTokens = *sp.SpacesBetweenSpecialTokens
	}
	logprobs := -1
	if sp.Logprobs != nil {
		logprobs = *sp.Logprobs
	}
	return &textState{tok: tok, opts: opts, prompt: prompt, logprobs: logprobs, stopTokenIDs: sp.StopTokenIDs}
}

// repetitionStopReason is vLLM's stop_reason of a choice its repetition detection ended.
const repetitionStopReason = "repetition_detected"

// finishStopReason is the stop reason of the engine's finish code on a choice whose last tokens
// are ids: for finishStop, the last token's id when it is one of the request's stop_token_ids,
// else nil (EOS); for repetition, vLLM's string; nil for the rest. vLLM's scheduler checks EOS
// before stop_token_ids, so an EOS id the client also listed gets nil there and its id here: Go
// does not know the EOS ids.
func finishStopReason(finish uint8, stopTokenIDs, ids []int32) any {
	if finish == finishRepetition {
		return repetitionStopReason
	}
	if finish != finishStop || len(ids) == 0 {
		return nil
	}
	last := ids[len(ids)-1]
	for _, id := range stopTokenIDs {
		if id == last {
			return last
		}
	}
	return nil
}

func (t *textState) choice(index int) *choiceText {
	for len(t.choices) <= index {
		t.choices = append(t.choices, choiceText{})
	}
	c := &t.choices[index]
	if c.out == nil {
		c.out = t.tok.NewOutput(t.opts, t.prompt)
	}
	return c
}

// completionTokens is the output tokens of every choice, as usage reports them.
func (t *textState) completionTokens() int {
	n := 0
	for i := range t.choices {
		if t.choices[i].out != nil {
			n += t.choices[i].out.NumTokens()
		}
	}
	return n
}

// textDelta is what one event adds to a choice once Go has detokenized it.
type textDelta struct {
	tokens     []int32
	text       string
	finish     string
	logprobs   []TokenLogprob
	stopString bool // Go matched a stop string: the engine must stop the choice
	stopReason any  // the matched stop string, or the stop token id that ended the choice
}

// apply detokenizes one event of a choice. ok is false when the event adds nothing (a choice
// already finished, or tokens whose text is held back, with no finish).
func (t *textState) apply(ev *event) (d textDelta, ok bool) {
	c := t.choice(int(ev.index))
	if c.done {
		return d, false
	}
	ids := ev.appendTokenIDs(nil)
	before := c.out.NumTokens()
	stop, matched := c.out.Update(ids, ev.finish == finishStop)
	kept := c.out.NumTokens() - before
	if kept < len(ids) {
		ids = ids[:kept]
	}
	d.finish = ev.finishReason()
	switch {
	case matched:
		// As vLLM's output processor: a stop string ends the choice with "stop" whatever the
		// engine said; the engine is told to stop it unless it already has.
		d.finish, d.stopString, d.stopReason = "stop", ev.finish == finishNone, stop
	default:
		d.stopReason = finishStopReason(ev.finish, t.stopTokenIDs, ids)
	}
	if d.finish != "" {
		c.done = true
	}
	d.text = c.out.Next(d.finish != "")
	d.tokens = ids
	if t.logprobs >= 0 && len(ev.meta) > 0 {
		d.logprobs = t.decodeLogprobs(ev.meta, c.out.TokenIDs(), before, len(ids))
	}
	return d, d.finish != "" || d.text != "" || len(d.tokens) > 0
}

// logprobFloor stands for -inf and NaN, which JSON cannot carry.
const logprobFloor = -9999.0

// decodeLogprobs reads a delta's logprobs meta: u32 rows, u32 cols, then rows×cols int32 token
// ids, rows×cols float32 logprobs (column 0 the sampled token, then the most likely tokens by
// rank) and rows int32 ranks of the sampled token. all holds the choice's output ids, the new
// ones from first on; n of them are kept.
func (t *textState) decodeLogprobs(meta []byte, all []int32, first, n int) []TokenLogprob {
	if len(meta) < 8 {
		return nil
	}
	rows := int(binary.LittleEndian.Uint32(meta))
	cols := int(binary.LittleEndian.Uint32(meta[4:]))
	if cols < 1 || len(meta) < 8+rows*cols*8+rows*4 {
		return nil
	}
	ids := meta[8 : 8+rows*cols*4]
	lps := meta[8+rows*cols*4 : 8+rows*cols*8]
	if n > rows {
		n = rows
	}
	top := t.logprobs
	if top > cols-1 {
		top = cols - 1
	}
	out := make([]TokenLogprob, n)
	for r := 0; r < n; r++ {
		ctx := all[:first+r]
		at := func(c int) TokenLogprob {
			i := r*cols + c
			id := int32(binary.LittleEndian.Uint32(ids[4*i:]))
			lp := float64(math.Float32frombits(binary.LittleEndian.Uint32(lps[4*i:])))
			return logprobEntry(t.tok.LogprobText(id, ctx), lp)
		}
		out[r] = at(0)
		if top > 0 {
			out[r].Top = make([]TokenLogprob, top)
			for c := 1; c <= top; c++ {
				out[r].Top[c-1] = at(c)
			}
		}
	}
	return out
}

// logprobEntry is one logprob as the server reports it: the token's text (detok's texts are
// valid UTF-8: undecodable bytes are U+FFFD), its logprob (NaN and -inf floored) and its bytes.
func logprobEntry(text string, lp float64) TokenLogprob {
	if math.IsNaN(lp) || lp < logprobFloor {
		lp = logprobFloor
	}
	b := make([]int, len(text))
	for i := 0; i < len(text); i++ {
		b[i] = int(text[i])
	}
	return TokenLogprob{Token: text, Logprob: lp, Bytes: b}
}
