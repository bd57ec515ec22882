package engine

import (
	"encoding/binary"
	"fmt"
	"unsafe"
)

// Event kinds written by the bridge (engine/python/govllm/bridge.py) through the shim:
// SHIM_EV_* in cshim/shim.h (checked by codes_test.go).
const (
	evDelta = 1 // tokens and text of one choice
	evEnd   = 2 // the request finished; meta: {"usage": {...}}
	evError = 3 // the request failed; meta: {"status", "type", "message", "param"}
	evReady = 4 // the engine started; meta: model info
	evFatal = 5 // the engine died; meta: {"message"}
	evLog   = 6 // a log line; meta: {"level", "message"}
	evStats = 7 // the answer to a stats command; meta: Stats
	// evPrompt carries the request's prompt token ids (meta: little-endian int32s), before its
	// first delta: the detokenizer is primed with them, and usage counts them.
	evPrompt = 8
	// evParsed answers cmdParse: a choice's output split by the backend's parsers (parse.go).
	evParsed = 9
	// evTokenized answers cmdTokenize.
	evTokenized = 10
	// evEmbedding answers cmdEmbed.
	evEmbedding = 11
	// evPromptLogprobs carries a request's prompt logprobs, before its first delta.
	evPromptLogprobs = 12
)

// The shim's finish codes: SHIM_FINISH_* in cshim/shim.h, the bridge's FINISH_CODES.
const (
	finishNone       = 0
	finishStop       = 1 // EOS or a stop token id: that token's text is not output
	finishLength     = 2
	finishAbort      = 3
	finishError      = 4 // the engine failed the request
	finishRepetition = 5 // vLLM's repetition detection: "stop", the last token's text kept
)

// finishReasons maps the finish codes to their names: OpenAI's finish_reason, except "error"
// (the request fails) and "repetition" (reported as "stop").
var finishReasons = [...]string{
	finishNone: "", finishStop: "stop", finishLength: "length", finishAbort: "abort",
	finishError: "error", finishRepetition: "repetition",
}

// headerSize is the fixed part of a record after its 4-byte length (see cshim/shim.c).
const headerSize = 24

// event is one decoded record. Tokens, text and meta point into the poll buffer and are only
// valid until the next poll; deliver copies what it keeps.
type event struct {
	kind   uint8
	finish uint8
	index  uint16
	reqID  int64
	tokens []byte // little-endian int32s
	text   []byte
	meta   []byte
}

// decodeEvents calls fn for each record in buf, which holds whole records as shim_poll wrote them.
func decodeEvents(buf []byte, fn func(*event)) error {
	var ev event
	for len(buf) > 0 {
		if len(buf) < 4 {
			return fmt.Errorf("engine: truncated event length (%d bytes left)", len(buf))
		}
		n := int(binary.LittleEndian.Uint32(buf))
		if n < headerSize || 4+n > len(buf) {
			return fmt.Errorf("engine: bad event size %d (%d bytes left)", n, len(buf)-4)
		}
		rec := buf[4 : 4+n]
		buf = buf[4+n:]
		ntok := int(binary.LittleEndian.Uint32(rec[4:]))
		tlen := int(binary.LittleEndian.Uint32(rec[16:]))
		mlen := int(binary.LittleEndian.Uint32(rec[20:]))
		if headerSize+4*ntok+tlen+mlen != n {
			return fmt.Errorf("engine: event parts (%d tokens, %d text, %d meta) do not add up to %d bytes", ntok, tlen, mlen, n)
		}
		ev.kind = rec[0]
		ev.finish = rec[1]
		ev.index = binary.LittleEndian.Uint16(rec[2:])
		ev.reqID = int64(binary.LittleEndian.Uint64(rec[8:]))
		p := rec[headerSize:]
		ev.tokens, p = p[:4*ntok], p[4*ntok:]
		ev.text, p = p[:tlen], p[tlen:]
		ev.meta = p[:mlen]
		fn(&ev)
	}
	return nil
}

// appendTokenIDs appends the event's tokens, copied out of the poll buffer, to dst.
func (ev *event) appendTokenIDs(dst []int32) []int32 {
	n := len(ev.tokens) / 4
	if n == 0 {
		return dst
	}
	start := len(dst)
	dst = append(dst, make([]int32, n)...)
	if nativeLittleEndian {
		copy(unsafe.Slice((*byte)(unsafe.Pointer(&dst[start])), 4*n), ev.tokens)
		return dst
	}
	for i := 0; i < n; i++ {
		dst[start+i] = int32(binary.LittleEndian.Uint32(ev.tokens[4*i:]))
	}
	return dst
}

// finishReason is the OpenAI finish_reason of the event's finish code.
func (ev *event) finishReason() string {
	switch ev.finish {
	case finishNone, finishLength, finishAbort:
		return finishReasons[ev.finish]
	}
	return "stop"
}

// int32s reads little-endian int32s (a prompt event's meta) into a new slice.
func int32s(b []byte) []int32 {
	out := make([]int32, len(b)/4)
	for i := range out {
		out[i] = int32(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return out
}

var nativeLittleEndian = func() bool {
	x := uint16(1)
	return *(*byte)(unsafe.Pointer(&x)) == 1
}()
