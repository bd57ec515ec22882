package engine

import (
	"io"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/detok"
)

// lastStopReason reads s to its end and returns each choice's finish and the stop reason of its
// finishing delta; a stop reason on any other delta fails the test.
func lastStopReason(t *testing.T, s *Stream) (finish map[int]string, reason map[int]any, text map[int]string) {
	t.Helper()
	finish, reason, text = map[int]string{}, map[int]any{}, map[int]string{}
	for {
		d, err := s.Recv()
		if err != nil {
			require.ErrorIs(t, err, io.EOF)
			return finish, reason, text
		}
		text[d.Index] += d.Text
		if d.FinishReason == "" {
			require.Nil(t, d.StopReason, "stop reason before the finish")
			continue
		}
		finish[d.Index], reason[d.Index] = d.FinishReason, d.StopReason
	}
}

func TestGoStopReason(t *testing.T) {
	tok := defaultTokenizer(t)
	full := tok.Decode(sampleIDs, detok.DefaultOptions())
	at := len(tok.Decode(sampleIDs[:4], detok.DefaultOptions()))
	stop := full[at-2 : at+2] // straddles tokens 3 and 4
	stopTok := sampleIDs[3]
	tests := []struct {
		name       string
		sp         SamplingParams
		events     []*event
		wantFinish string
		wantReason any
		wantText   string
	}{
		{
			name:       "stop string",
			sp:         SamplingParams{Stop: []string{"zzz-never", stop}},
			events:     []*event{idsEvent(0, finishNone, sampleIDs[:8]...)},
			wantFinish: "stop", wantReason: stop, wantText: full[:at-2],
		},
		{
			name:       "stop string with include_stop_str_in_output",
			sp:         SamplingParams{Stop: []string{stop}, IncludeStopStrInOutput: true},
			events:     []*event{idsEvent(0, finishNone, sampleIDs[:8]...)},
			wantFinish: "stop", wantReason: stop, wantText: full[:at+2],
		},
		{
			name:       "stop string in the step the engine ended with length",
			sp:         SamplingParams{Stop: []string{stop}},
			events:     []*event{idsEvent(0, finishLength, sampleIDs[:5]...)},
			wantFinish: "stop", wantReason: stop, wantText: full[:at-2],
		},
		{
			name:       "stop token id",
			sp:         SamplingParams{StopTokenIDs: []int32{9999, stopTok}},
			events:     []*event{idsEvent(0, finishNone, sampleIDs[:3]...), idsEvent(0, finishStop, stopTok)},
			wantFinish: "stop", wantReason: stopTok,
			wantText: tok.Decode(sampleIDs[:3], detok.DefaultOptions()),
		},
		{
			name:       "stop token id with include_stop_str_in_output",
			sp:         SamplingParams{StopTokenIDs: []int32{stopTok}, IncludeStopStrInOutput: true},
			events:     []*event{idsEvent(0, finishNone, sampleIDs[:3]...), idsEvent(0, finishStop, stopTok)},
			wantFinish: "stop", wantReason: stopTok,
			wantText: tok.Decode(sampleIDs[:4], detok.DefaultOptions()),
		},
		{
			name:       "EOS",
			sp:         SamplingParams{StopTokenIDs: []int32{9999}},
			events:     []*event{idsEvent(0, finishStop, sampleIDs[0], 2)},
			wantFinish: "stop", wantReason: nil, wantText: tok.Decode(sampleIDs[:1], detok.DefaultOptions()),
		},
		{
			name:       "length",
			events:     []*event{idsEvent(0, finishLength, sampleIDs[:2]...)},
			wantFinish: "length", wantReason: nil, wantText: tok.Decode(sampleIDs[:2], detok.DefaultOptions()),
		},
		{
			name:       "repetition",
			events:     []*event{idsEvent(0, finishRepetition, sampleIDs[:2]...)},
			wantFinish: "stop", wantReason: "repetition_detected", wantText: tok.Decode(sampleIDs[:2], detok.DefaultOptions()),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, _ := textStream(t, tt.sp, nil)
			for _, ev := range tt.events {
				require.True(t, s.pushEvent(ev))
			}
			s.e.handle(&event{kind: evEnd, reqID: 7})
			finish, reason, text := lastStopReason(t, s)
			require.Equal(t, tt.wantFinish, finish[0])
			require.Equal(t, tt.wantReason, reason[0])
			require.Equal(t, tt.wantText, text[0])
		})
	}
}

// A backend that sends text: only a stop token id is known to Go.
func TestTextBackendStopReason(t *testing.T) {
	for _, tt := range []struct {
		name   string
		finish uint8
		ids    []int32
		want   any
	}{
		{name: "stop token id", finish: finishStop, ids: []int32{5, 42}, want: int32(42)},
		{name: "EOS", finish: finishStop, ids: []int32{5, 2}, want: nil},
		{name: "length", finish: finishLength, ids: []int32{5, 42}, want: nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e := &Engine{streams: map[int64]*Stream{}, api: (&sentCommands{}).api()}
			s := newStream(e, 7, 1<<20, SamplingParams{StopTokenIDs: []int32{42}})
			e.streams[7] = s
			ev := idsEvent(0, tt.finish, tt.ids...)
			ev.text = []byte("hi")
			require.True(t, s.pushEvent(ev))
			e.handle(&event{kind: evEnd, reqID: 7})
			_, reason, text := lastStopReason(t, s)
			require.Equal(t, tt.want, reason[0])
			require.Equal(t, "hi", text[0])
		})
	}
}
