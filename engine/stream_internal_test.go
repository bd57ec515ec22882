package engine

import (
	"encoding/binary"
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"
)

// These tests drive a Stream's queue directly with synthetic delta events, as the poller does,
// to check MaxPendingTokens' accounting: a stream holds unread tokens plus one per unread delta,
// and unread deltas of one choice are merged.

// deltaEvent is a one-token delta event of choice index.
func deltaEvent(index int, token int32) *event {
	return &event{kind: evDelta, index: uint16(index), tokens: binary.LittleEndian.AppendUint32(nil, uint32(token)),
		text: []byte(fmt.Sprintf("<%d>", token))}
}

// testStream is a stream whose engine only needs its routing table (pushEvent forgets a stream
// that it cuts off).
func testStream(max int) *Stream {
	return newStream(&Engine{streams: map[int64]*Stream{}}, 1, max, SamplingParams{})
}

// TestStreamKeepingUpIsNeverCutOff: a reader that reads one delta each time k events arrived
// holds at most about k unread tokens per choice, whatever the number of choices, so a limit a
// few times k is never reached.
func TestStreamKeepingUpIsNeverCutOff(t *testing.T) {
	const k, events = 8, 6000 // events: a multiple of every n below
	for _, n := range []int{1, 2, 3} {
		t.Run(fmt.Sprintf("n=%d", n), func(t *testing.T) {
			s := testStream(4*k + n)
			got := make([][]int32, n)
			for i := 0; i < events; i++ {
				unread := s.backlog
				require.True(t, s.pushEvent(deltaEvent(i%n, int32(i))), "cut off at event %d with %d unread", i, unread)
				if (i+1)%k == 0 {
					d, err := s.Recv()
					require.NoError(t, err)
					got[d.Index] = append(got[d.Index], d.TokenIDs...)
				}
			}
			for s.head < len(s.pending) {
				d, err := s.Recv()
				require.NoError(t, err)
				got[d.Index] = append(got[d.Index], d.TokenIDs...)
			}
			require.Zero(t, s.backlog, "nothing unread costs nothing")
			for c := 0; c < n; c++ {
				require.Equal(t, events/n, len(got[c]), "choice %d's tokens", c)
				for j, tok := range got[c] {
					if int(tok) != c+j*n {
						t.Fatalf("choice %d: token %d is %d, want %d", c, j, tok, c+j*n)
					}
				}
			}
		})
	}
}

// TestStreamMergesPerChoice: interleaved events of two choices merge into one unread delta per
// choice, each at the position of its choice's first unread event.
func TestStreamMergesPerChoice(t *testing.T) {
	s := testStream(100)
	for i, c := range []int{0, 1, 0, 1, 1, 0} {
		require.True(t, s.pushEvent(deltaEvent(c, int32(i))))
	}
	require.Equal(t, 6+2, s.backlog, "six tokens in two deltas")
	d, err := s.Recv()
	require.NoError(t, err)
	require.Equal(t, 0, d.Index)
	require.Equal(t, []int32{0, 2, 5}, d.TokenIDs)
	require.Equal(t, "<0><2><5>", d.Text)
	require.Equal(t, 3+1, s.backlog, "the delta read no longer counts")

	// Choice 0 was read: its next event is a new delta behind choice 1's unread one, which
	// keeps merging in place.
	require.True(t, s.pushEvent(deltaEvent(0, 6)))
	require.True(t, s.pushEvent(deltaEvent(1, 7)))
	d, err = s.Recv()
	require.NoError(t, err)
	require.Equal(t, 1, d.Index)
	require.Equal(t, []int32{1, 3, 4, 7}, d.TokenIDs)
	require.Equal(t, "<1><3><4><7>", d.Text)
	d, err = s.Recv()
	require.NoError(t, err)
	require.Equal(t, 0, d.Index)
	require.Equal(t, []int32{6}, d.TokenIDs)
	require.Zero(t, s.backlog)

	// A delta with a finish reason ends its choice's merging: what follows is a delta of its own.
	fin := deltaEvent(1, 8)
	fin.finish = 1
	require.True(t, s.pushEvent(deltaEvent(0, 9)))
	require.True(t, s.pushEvent(fin))
	require.True(t, s.pushEvent(deltaEvent(1, 10)))
	require.True(t, s.pushEvent(deltaEvent(0, 11)))
	var order []string
	for s.head < len(s.pending) {
		d, err := s.Recv()
		require.NoError(t, err)
		order = append(order, fmt.Sprintf("%d:%v:%s", d.Index, d.TokenIDs, d.FinishReason))
	}
	require.Equal(t, []string{"0:[9 11]:", "1:[8]:stop", "1:[10]:"}, order)
	require.Zero(t, s.backlog)
}

// TestStreamLimitTripsForIdleReader: a reader that never reads is cut off once its unread
// tokens plus unread deltas pass the limit, and then gets ErrSlowConsumer.
func TestStreamLimitTripsForIdleReader(t *testing.T) {
	const max = 100
	for _, n := range []int{1, 2} {
		t.Run(fmt.Sprintf("n=%d", n), func(t *testing.T) {
			s := testStream(max)
			s.e.streams[s.id] = s
			pushed := 0
			for s.pushEvent(deltaEvent(pushed%n, int32(pushed))) {
				pushed++
				require.Less(t, pushed, 10*max, "never cut off")
			}
			// Merged: n deltas hold every token, so the limit trips at the token that makes
			// tokens + n exceed it.
			require.Equal(t, max-n, pushed)
			require.NotContains(t, s.e.streams, s.id, "a stream cut off leaves the routing table")
			_, err := s.Recv()
			require.ErrorIs(t, err, ErrSlowConsumer)
		})
	}
}
