package engine

import (
	"encoding/binary"
	"errors"
	"io"
	"math"
	"strings"
	"sync"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/detok"
)

// These tests drive a Go-detokenized stream as the poller does: a prompt event, then delta
// events carrying token ids only (as the bridge's relay frames them), with the default model's
// tokenizer. What Go must do: the text of the ids, stop strings across tokens (the choice
// ends, the engine is told, later events are dropped, usage counts what was kept), a stop
// token's text left out, an engine error failing the request, logprobs from the binary meta.

func defaultTokenizer(t *testing.T) *detok.Tokenizer {
	t.Helper()
	tok, err := detok.Load("../models/SmolLM2-135M-Instruct")
	if errors.Is(err, io.ErrUnexpectedEOF) || (err != nil && strings.Contains(err.Error(), "no such file")) {
		t.Skip("the default model is not installed (make bootstrap)")
	}
	require.NoError(t, err)
	return tok
}

// sentCommands records what a stream sends to the bridge.
type sentCommands struct {
	mu   sync.Mutex
	cmds []string
}

func (c *sentCommands) api() *shimAPI {
	return &shimAPI{send: func(kind int32, _ int64, data *byte, n int64) int32 {
		c.mu.Lock()
		defer c.mu.Unlock()
		s := ""
		if data != nil {
			s = string(unsafeBytes(data, n))
		}
		c.cmds = append(c.cmds, map[int32]string{cmdAbort: "abort", cmdStopChoice: "stop-choice"}[kind]+":"+s)
		return 0
	}}
}

func textStream(t *testing.T, sp SamplingParams, prompt []int32) (*Stream, *sentCommands) {
	tok := defaultTokenizer(t)
	sent := &sentCommands{}
	e := &Engine{streams: map[int64]*Stream{}, api: sent.api()}
	e.tok.Store(tok)
	s := newStream(e, 7, 1<<20, sp)
	e.streams[7] = s
	e.handle(&event{kind: evPrompt, reqID: 7, meta: int32Bytes(prompt)})
	require.NotNil(t, s.text, "the prompt event starts Go-side detokenization")
	return s, sent
}

func int32Bytes(ids []int32) []byte {
	b := make([]byte, 0, 4*len(ids))
	for _, id := range ids {
		b = binary.LittleEndian.AppendUint32(b, uint32(id))
	}
	return b
}

func idsEvent(index int, finish uint8, ids ...int32) *event {
	return &event{kind: evDelta, reqID: 7, index: uint16(index), finish: finish, tokens: int32Bytes(ids)}
}

// drain reads the stream to its end.
func drain(t *testing.T, s *Stream) (text map[int]string, ids map[int][]int32, finish map[int]string, err error) {
	text, ids, finish = map[int]string{}, map[int][]int32{}, map[int]string{}
	for {
		d, e := s.Recv()
		if e != nil {
			return text, ids, finish, e
		}
		text[d.Index] += d.Text
		ids[d.Index] = append(ids[d.Index], d.TokenIDs...)
		if d.FinishReason != "" {
			finish[d.Index] = d.FinishReason
		}
	}
}

// sampleIDs are ordinary output ids of the default model (a greedy answer about Paris).
var sampleIDs = []int32{504, 3575, 282, 4649, 314, 7042, 30, 378, 1345, 282, 260, 1789, 314, 1064, 2014, 30}

func TestGoDetokenizesTokenIDs(t *testing.T) {
	tok := defaultTokenizer(t)
	prompt := []int32{1, 9690, 198}
	s, sent := textStream(t, SamplingParams{}, prompt)
	for i, id := range sampleIDs {
		finish := uint8(finishNone)
		if i == len(sampleIDs)-1 {
			finish = finishLength
		}
		require.True(t, s.pushEvent(idsEvent(0, finish, id)))
	}
	s.e.handle(&event{kind: evEnd, reqID: 7, meta: []byte(`{"usage":{"prompt_tokens":3,"completion_tokens":0}}`)})
	text, ids, finish, err := drain(t, s)
	require.ErrorIs(t, err, io.EOF)
	want := tok.NewStream(detok.DefaultOptions(), prompt).Step(sampleIDs...)
	require.Equal(t, want, text[0])
	require.Equal(t, sampleIDs, ids[0])
	require.Equal(t, "length", finish[0])
	require.Equal(t, Usage{PromptTokens: 3, CompletionTokens: len(sampleIDs)}, s.Usage(), "Go counts the output")
	require.Empty(t, sent.cmds)
}

func TestGoStopStringAcrossTokens(t *testing.T) {
	tok := defaultTokenizer(t)
	full := tok.Decode(sampleIDs, detok.DefaultOptions())
	// A stop string straddling a token boundary: the last two characters of token 3's text and
	// the first two of token 4's.
	at := len(tok.Decode(sampleIDs[:4], detok.DefaultOptions()))
	stop := full[at-2 : at+2]
	require.NotContains(t, full[:at-2], stop)
	for _, include := range []bool{false, true} {
		s, sent := textStream(t, SamplingParams{Stop: []string{stop}, IncludeStopStrInOutput: include}, nil)
		for _, id := range sampleIDs {
			require.True(t, s.pushEvent(idsEvent(0, finishNone, id)))
		}
		s.e.handle(&event{kind: evEnd, reqID: 7})
		text, ids, finish, err := drain(t, s)
		require.ErrorIs(t, err, io.EOF)
		want := full[:at-2]
		if include {
			want = full[:at+2]
		}
		require.Equal(t, want, text[0], "include_stop_str_in_output=%v", include)
		require.Equal(t, "stop", finish[0])
		require.Equal(t, sampleIDs[:5], ids[0], "tokens after the one completing the stop string are dropped")
		require.Equal(t, 5, s.Usage().CompletionTokens)
		require.Equal(t, []string{"stop-choice:0"}, sent.cmds, "the engine is told once")
	}
}

func TestGoStopTokenTextLeftOut(t *testing.T) {
	tok := defaultTokenizer(t)
	s, _ := textStream(t, SamplingParams{}, nil)
	require.True(t, s.pushEvent(idsEvent(0, finishNone, sampleIDs[:3]...)))
	require.True(t, s.pushEvent(idsEvent(0, finishStop, sampleIDs[3])))
	s.e.handle(&event{kind: evEnd, reqID: 7})
	text, _, finish, err := drain(t, s)
	require.ErrorIs(t, err, io.EOF)
	require.Equal(t, tok.NewStream(detok.DefaultOptions(), nil).Step(sampleIDs[:3]...), text[0])
	require.Equal(t, "stop", finish[0])
	require.Equal(t, 4, s.Usage().CompletionTokens, "the stop token is counted")
}

func TestGoChoicesAreIndependent(t *testing.T) {
	tok := defaultTokenizer(t)
	full := tok.Decode(sampleIDs, detok.DefaultOptions())
	stop := strings.TrimSpace(tok.Decode(sampleIDs[5:6], detok.DefaultOptions()))
	s, sent := textStream(t, SamplingParams{Stop: []string{stop}, N: 2}, nil)
	for i, id := range sampleIDs {
		require.True(t, s.pushEvent(idsEvent(0, finishNone, id)))
		finish := uint8(finishNone)
		if i == 5 {
			finish = finishLength
		}
		if i <= 5 {
			require.True(t, s.pushEvent(idsEvent(1, finish, sampleIDs[len(sampleIDs)-1-i])))
		}
	}
	s.e.handle(&event{kind: evEnd, reqID: 7})
	text, _, finish, err := drain(t, s)
	require.ErrorIs(t, err, io.EOF)
	require.Equal(t, full[:strings.Index(full, stop)], text[0])
	require.Equal(t, map[int]string{0: "stop", 1: "length"}, finish)
	require.Equal(t, []string{"stop-choice:0"}, sent.cmds)
	require.NotEmpty(t, text[1])
}

func TestGoEngineErrorFailsTheRequest(t *testing.T) {
	s, _ := textStream(t, SamplingParams{}, nil)
	require.True(t, s.pushEvent(idsEvent(0, finishNone, sampleIDs[0])))
	require.True(t, s.pushEvent(idsEvent(0, finishError, sampleIDs[1])))
	_, _, _, err := drain(t, s)
	var re *RequestError
	require.ErrorAs(t, err, &re)
	require.Equal(t, 500, re.Status)
}

func TestGoLogprobsFromMeta(t *testing.T) {
	tok := defaultTokenizer(t)
	two := 2
	s, _ := textStream(t, SamplingParams{Logprobs: &two}, nil)
	// rows 2, cols 4 (a batch asking for 3 at most): this request wants 2 of them.
	ids := []int32{sampleIDs[0], 11, sampleIDs[0], 12, sampleIDs[1], sampleIDs[1], 13, 14}
	lps := []float32{-0.5, -0.1, -0.5, -2, float32(math.Inf(-1)), -0.2, -1, -3}
	meta := binary.LittleEndian.AppendUint32(nil, 2)
	meta = binary.LittleEndian.AppendUint32(meta, 4)
	meta = append(meta, int32Bytes(ids)...)
	for _, v := range lps {
		meta = binary.LittleEndian.AppendUint32(meta, math.Float32bits(v))
	}
	meta = append(meta, int32Bytes([]int32{2, 1})...)
	ev := idsEvent(0, finishLength, sampleIDs[0], sampleIDs[1])
	ev.meta = meta
	require.True(t, s.pushEvent(ev))
	s.e.handle(&event{kind: evEnd, reqID: 7})
	d, err := s.Recv()
	require.NoError(t, err)
	require.Len(t, d.Logprobs, 2)
	require.Equal(t, tok.TokenText(sampleIDs[0]), d.Logprobs[0].Token)
	require.InDelta(t, -0.5, d.Logprobs[0].Logprob, 1e-6)
	require.Len(t, d.Logprobs[0].Top, 2)
	require.Equal(t, tok.TokenText(11), d.Logprobs[0].Top[0].Token)
	require.Equal(t, logprobFloor, d.Logprobs[1].Logprob, "-inf is floored")
	require.Equal(t, tok.TokenText(13), d.Logprobs[1].Top[1].Token)
	require.Equal(t, []byte(d.Logprobs[0].Token), intsToBytes(d.Logprobs[0].Bytes))
}

func intsToBytes(b []int) []byte {
	out := make([]byte, len(b))
	for i, v := range b {
		out[i] = byte(v)
	}
	return out
}

func unsafeBytes(p *byte, n int64) []byte { return unsafe.Slice(p, n) }
