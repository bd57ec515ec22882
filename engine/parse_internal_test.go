package engine

import (
	"encoding/json"
	"log/slog"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/require"
)

// parseHarness is a stream with output parsing whose engine records the parse commands it
// would send to the bridge; replies are fed back as evParsed would be.
type parseHarness struct {
	s    *Stream
	sent []parseCommand
}

func newParseHarness(t *testing.T, streamed bool) *parseHarness {
	h := &parseHarness{}
	e := &Engine{streams: map[int64]*Stream{}, log: slog.New(slog.DiscardHandler)}
	e.api = &shimAPI{send: func(kind int32, reqID int64, data *byte, n int64) int32 {
		require.Equal(t, int32(cmdParse), kind)
		var c parseCommand
		require.NoError(t, json.Unmarshal(unsafe.Slice(data, n), &c))
		h.sent = append(h.sent, c)
		return 0
	}}
	h.s = newStream(e, 1, 1000, SamplingParams{})
	h.s.parse = &parseState{streamed: streamed}
	return h
}

func (h *parseHarness) reply(t *testing.T, m map[string]any) bool {
	data, err := json.Marshal(m)
	require.NoError(t, err)
	return h.s.onParsed(data)
}

// TestParsedDeltasKeepTheirTokensAndOrder: a streamed request's deltas go to the parsers one by
// one and come back with the parsed text, in order, with their own tokens and finish; a choice
// that called a tool finishes with "tool_calls"; unread parsed deltas merge without losing
// reasoning or call pieces.
func TestParsedDeltasKeepTheirTokensAndOrder(t *testing.T) {
	h := newParseHarness(t, true)
	h.s.deliver(Delta{Index: 0, TokenIDs: []int32{1}, Text: "<think>a"})
	h.s.deliver(Delta{Index: 0, TokenIDs: []int32{2}, Text: "</think>"})
	h.s.deliver(Delta{Index: 0, TokenIDs: []int32{3}, Text: "call", FinishReason: "stop"})
	require.Equal(t, []parseCommand{
		{Index: 0, Text: "<think>a", TokenIDs: []int32{1}},
		{Index: 0, Text: "</think>", TokenIDs: []int32{2}},
		{Index: 0, Text: "call", TokenIDs: []int32{3}, Finished: true},
	}, h.sent)
	require.Equal(t, 3, h.s.parse.outstanding)
	require.False(t, h.reply(t, map[string]any{"index": 0, "reasoning": "a"}))
	h.s.parse.end = &Usage{CompletionTokens: 3} // END arrived meanwhile
	require.False(t, h.reply(t, map[string]any{"index": 0}))
	require.True(t, h.reply(t, map[string]any{"index": 0, "tool_calls": []map[string]any{
		{"index": 0, "id": "call_1", "type": "function", "name": "f", "arguments": "{}"}}, "tools_called": true}),
		"the last reply completes the END that waited for it")
	d, err := h.s.Recv()
	require.NoError(t, err)
	require.Equal(t, Delta{Index: 0, TokenIDs: []int32{1, 2, 3}, Reasoning: "a", FinishReason: "tool_calls",
		ToolCalls: []ToolCallDelta{{Index: 0, ID: "call_1", Type: "function", Name: "f", Arguments: "{}"}}}, d)
}

// TestWholeParsingSendsEachChoiceOnce: a non-streamed request sends each choice's text to the
// parsers once, when it finished, with all of its tokens.
func TestWholeParsingSendsEachChoiceOnce(t *testing.T) {
	h := newParseHarness(t, false)
	h.s.deliver(Delta{Index: 1, TokenIDs: []int32{7}, Text: "x"})
	h.s.deliver(Delta{Index: 0, TokenIDs: []int32{5}, Text: "he"})
	h.s.deliver(Delta{Index: 0, TokenIDs: []int32{6}, Text: "llo", FinishReason: "length"})
	require.Equal(t, []parseCommand{{Index: 0, Text: "hello", TokenIDs: []int32{5, 6}, Finished: true, Whole: true}}, h.sent)
	require.False(t, h.reply(t, map[string]any{"index": 0, "content": "HELLO"}))
	d, err := h.s.Recv()
	require.NoError(t, err)
	require.Equal(t, Delta{Index: 0, TokenIDs: []int32{5, 6}, Text: "HELLO", FinishReason: "length"}, d)
	// A reply for a choice with nothing outstanding is refused, not delivered.
	require.False(t, h.reply(t, map[string]any{"index": 1, "content": "?"}))
	require.Equal(t, 0, h.s.parse.outstanding)
}
